"""Real English and French text under ``<data>/text`` split into documents with metadata.

Every file is read from the shared offline data folder (never copied into the repo). A *document* is one
natural unit where the source has one (a C4 page, a TinyStories story, a WikiText-2 article, a PIAF
paragraph); books and plays are cut into chunks of whole paragraphs of about ``doc_chars`` characters.
Project Gutenberg licence headers/footers are stripped, because they repeat verbatim across books and
would dominate near-duplicate detection.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# (glob relative to <data>/text, language, genre, splitter)
SOURCES: list[tuple[str, str, str, str]] = [
    ("en/c4/c4_demo.jsonl", "en", "web", "jsonl"),
    ("en/gutenberg/*.txt", "en", "literature", "paragraphs"),
    ("en/tinyshakespeare/input.txt", "en", "drama", "paragraphs"),
    ("en/tinystories/*.txt", "en", "children", "blank_lines"),
    ("en/wikipedia/wiki_demo.txt", "en", "encyclopedia", "lines"),
    ("en/wikitext-2/*.tokens", "en", "encyclopedia", "wikitext"),
    ("fr/gutenberg/*.txt", "fr", "literature", "paragraphs"),
    ("fr/piaf/piaf-v1.1.json", "fr", "encyclopedia", "squad"),
    ("parallel/alice_en.txt", "en", "children", "paragraphs"),
    ("parallel/alice_fr.txt", "fr", "children", "paragraphs"),
]

_PG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)
_PG_END = re.compile(r"^\s*\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $", re.M)


@dataclass
class CorpusConfig:
    doc_chars: int = 2000          # target size of chunks cut from books/plays/long articles
    min_chars: int = 200           # drop shorter documents (headings, stray lines)
    max_bytes: int = 0             # stop once this many UTF-8 bytes are loaded per language (0 = all)
    languages: list[str] = field(default_factory=lambda: ["en", "fr"])

    def validate(self) -> None:
        if self.doc_chars < self.min_chars or self.min_chars < 1:
            raise ValueError(f"corpus.doc_chars ({self.doc_chars}) must be >= corpus.min_chars "
                             f"({self.min_chars}) >= 1")
        bad = set(self.languages) - {"en", "fr"}
        if bad or not self.languages:
            raise ValueError(f"corpus.languages must be a non-empty subset of [en, fr], got {self.languages}")


def strip_gutenberg(text: str) -> str:
    """Body of a Project Gutenberg file (between the START and END markers) if it has them."""
    start, end = _PG_START.search(text), _PG_END.search(text)
    if start:
        text = text[start.end():end.start() if end else None]
    return text


def pack_paragraphs(text: str, doc_chars: int) -> list[str]:
    """Greedily join blank-line separated paragraphs into chunks of about ``doc_chars`` characters."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    docs, cur, size = [], [], 0
    for p in paras:
        if cur and size + len(p) > doc_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def _split(path: Path, how: str, doc_chars: int) -> list[str]:
    raw = path.read_text(encoding="utf-8")
    if how == "jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError) as exc:
                    raise ValueError(f"{path}:{i}: not a JSON object with a 'text' field ({exc})") from None
        return docs
    if how == "squad":
        try:
            data = json.loads(raw)["data"]
            return [p["context"] for art in data for p in art["paragraphs"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a SQuAD-format JSON file ({exc})") from None
    if how == "lines":  # one article per line: chunk each one
        return [c for line in raw.splitlines() if line.strip()
                for c in pack_paragraphs(line.replace(". ", ".\n\n"), doc_chars)]
    if how == "wikitext":  # articles start at top-level " = Title = " lines
        bounds = [m.start() for m in _WIKITEXT_TITLE.finditer(raw)] + [len(raw)]
        return [c for a, b in zip(bounds, bounds[1:]) for c in pack_paragraphs(raw[a:b], doc_chars)]
    if how == "blank_lines":
        return [p.strip() for p in re.split(r"\n\s*\n", raw) if p.strip()]
    if how == "paragraphs":
        return pack_paragraphs(strip_gutenberg(raw), doc_chars)
    raise ValueError(f"unknown splitter '{how}' for {path}")


def load_corpus(data_dir: str | Path, cfg: CorpusConfig | None = None):
    """A ``datasets.Dataset`` with columns id, text, source, genre, language, n_chars, n_bytes."""
    from datasets import Dataset

    cfg = cfg or CorpusConfig()
    langs = list(cfg.languages)
    root = Path(data_dir) / "text"
    if not root.is_dir():
        raise FileNotFoundError(f"no text folder at {root} (set --data-dir or LLM4ALL_DATA)")
    rows: dict[str, list] = {k: [] for k in ("id", "text", "source", "genre", "language", "n_chars", "n_bytes")}
    loaded = dict.fromkeys(langs, 0)
    for pattern, lang, genre, how in SOURCES:
        if lang not in langs:
            continue
        for path in sorted(root.glob(pattern)):
            source = f"{path.parent.name}/{path.stem}"
            for j, doc in enumerate(_split(path, how, cfg.doc_chars)):
                if len(doc) < cfg.min_chars or (cfg.max_bytes and loaded[lang] >= cfg.max_bytes):
                    continue
                nb = len(doc.encode("utf-8"))
                loaded[lang] += nb
                for k, v in (("id", f"{source}#{j}"), ("text", doc), ("source", source), ("genre", genre),
                             ("language", lang), ("n_chars", len(doc)), ("n_bytes", nb)):
                    rows[k].append(v)
    missing = [lg for lg in langs if loaded[lg] == 0]
    if missing:
        raise FileNotFoundError(f"no {', '.join(missing)} text found under {root}")
    return Dataset.from_dict(rows)
