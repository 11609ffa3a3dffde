"""The generated results report (``results/REPORT.md``) and its table registry.

Experiments register report tables the way they register figures (``common.plotting.register_figure``),
in their ``exp_*/figures.py``:

    from common.report import pivot, register_table, select

    @register_table("cost_table", experiment="exp_tor", title="Training cost per GPT size",
                    sources=("tor_cost_table",), deck="training_costs")
    def cost_table(rows):                  # rows = the experiment's latest rows of results.csv
        t = select(rows, "tor_cost_table", needs=("p.model", "p.gpus"))
        if t.empty:
            return None                    # the rows it needs are absent: the report says so
        return pivot(t, index=["p.model", "p.gpus"], columns="metric")

A table function returns a pandas DataFrame whose cells are row values (numbers are printed by the
report, never by the function), or ``(frame, shown_rows)`` to cite exactly the rows shown, or None.
Cells may be numbers, strings, or ``PM(value, stderr)`` (printed ``v ± s``). ``sources`` names the
results tables it reads: their runs (commit, device, profile, start time) are cited under the table
unless ``shown_rows`` is returned. ``deck`` names the slide-deck item(s) it reproduces (``DECK`` keys).
Helpers: ``select`` (one results table, some metrics/methods), ``pivot`` (metrics or methods as columns;
refuses to average), ``long`` (rows as they are, value ± stderr and n), ``pm`` (PM cells). Results tables
that no registered table names in ``sources`` are printed as logged when small (``GENERIC_MAX_ROWS``),
under anchors ``rows-<experiment>-<table>``; registered tables live under ``table-<experiment>-<name>``,
figures under ``figure-<experiment>-<name>``, experiments under ``<experiment>``, the deck under ``deck``.

``results/make_figures.py`` calls ``write_report`` after drawing the figures. Rules the report keeps
(``tests/test_report.py`` checks them):

* Every number is a value, stderr, n, seed or parameter of a row of ``results.csv``, or a number inside
  a string field of a row (a method name or string parameter, copied verbatim). Nothing is computed:
  no means, ratios or differences (a table shows what an experiment logged, e.g. each seed's row and the
  mean row the experiment logged).
* One number format (``fmt_number``): integers, and integral floats below 1e15, in full; every other
  number with four significant digits (``%.4g``); missing or non-finite: an em dash.
* Numbers that do not come from a row's values appear only in provenance: the lines starting with
  ``Source:`` and the table columns named in ``PROVENANCE_COLUMNS`` (run id, commit, device, start time),
  plus column headers. Issue references are written ``#N``.
* Deterministic: the same rows give a byte-identical report (sorted, no clock read; the only times are
  the rows' own start times).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from common.paths import REPO_ROOT
from common.plotting import FIGURES, FigureSpec, as_tuple

SOURCE_PREFIX = "Source:"
PROVENANCE_COLUMNS = ("run", "commit", "device", "started", "uncommitted changes")
GENERIC_MAX_ROWS = 60  # results tables no registered table shows are printed as-is up to this size
PROFILE_LABELS = {"quick": "quick (smoke test)", "bench": "bench (benchmark)", "paper": "paper"}
EMPTY = "—"

TABLES: dict[str, TableSpec] = {}


# ------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class TableSpec:
    name: str
    experiment: str
    title: str
    func: Callable
    sources: tuple[str, ...]
    deck: tuple[str, ...] = ()
    note: str | None = None

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.name}"

    @property
    def anchor(self) -> str:
        return f"table-{self.experiment}-{self.name}"


def register_table(name: str, experiment: str, title: str, sources: str | Sequence[str] | None = None,
                   deck: str | Sequence[str] | None = None, note: str | None = None
                   ) -> Callable[[Callable], Callable]:
    """Register ``func(rows) -> DataFrame | (DataFrame, shown_rows) | None`` as a report table.

    ``sources`` defaults to ``(name,)``; ``note`` is one line of prose printed under the title (write
    numbers there only if they are in results.csv; better: none)."""
    def deco(func: Callable) -> Callable:
        key = f"{experiment}/{name}"
        if key in TABLES and TABLES[key].func.__qualname__ != func.__qualname__:
            raise ValueError(f"table {key} registered twice ({TABLES[key].func.__qualname__}, "
                             f"{func.__qualname__})")
        TABLES[key] = TableSpec(name, experiment, title, func, as_tuple(sources) or (name,), as_tuple(deck), note)
        return func
    return deco


# -------------------------------------------------------------------------------------- the deck
@dataclass(frozen=True)
class DeckItem:
    key: str
    kind: str          # what the deck shows: table, figure, schematic, formulas, bullets
    title: str         # the deck's own wording (no numbers: the report prints only results numbers)
    missing: str | None = None  # what is not reproduced yet and which experiment/issue will do it
    note: str | None = None     # a caveat about the counterpart


# The tables and figures of ../shared/seeds/002_*.txt, in the deck's order.
DECK: list[DeckItem] = [
    DeckItem("llm_size", "figure", "LLMs size grows (model size over time)",
             "no experiment or issue plans it (an illustration of published model sizes)"),
    DeckItem("training_costs", "table", "LLM Training Costs on MosaicML Cloud: tokens (compute-optimal), "
             "days to train and approximate cost per GPT size"),
    DeckItem("mixed_precision", "table", "Mixed Precision Training (Micikevicius et al.): baseline vs "
             "mixed-precision accuracy per model",
             note="the deck's rows are ImageNet classifiers; the counterpart here is a toy-scale language model"),
    DeckItem("quantization", "schematic", "Quantization: quantization-aware training and post-training "
             "quantization"),
    DeckItem("low_rank", "schematic", "Low-rank factorization (LoRA)"),
    DeckItem("pruning", "schematic", "Pruning"),
    DeckItem("distillation", "schematic", "Knowledge distillation: teacher and student"),
    DeckItem("diversity", "figure", "Diversity coefficient: Task2Vec embeddings of sampled batches and "
             "their expected pairwise cosine distance",
             "values comparable with the published ones (reference settings, larger batches): issue #16 and "
             "the paper profile"),
    DeckItem("d4", "figure", "D4 sampler (MinHash, SemDeDup, SSL prototypes): learning curves of OPT "
             "pretraining on D4-selected vs random data",
             "the deck's scale (OPT pretraining): the study here trains small Llama models on CPU; its paper "
             "profile is the GPU-sized version"),
    DeckItem("askllm", "figure", "ASK-LLM: P(yes | prompt) as the quality score; T5-Large trained on "
             "ASK-LLM-selected data",
             "the deck's scorer and student (Flan-T5 scoring, T5-Large training): here SmolLM2 scores and a "
             "small Llama trains"),
    DeckItem("density", "bullets", "Density sampling: down-sample prototypical (dense) regions, boost rare ones",
             None),
    DeckItem("data_age", "table", "Pretraining data of published models: domains, filters, year "
             "(Longpre et al.)", "no experiment or issue plans it"),
    DeckItem("data_age_effect", "figure", "Impact of data age: misalignment hurts larger models more",
             "no experiment or issue plans it"),
    DeckItem("curriculum", "figure", "Curriculum learning: training on examples of increasing difficulty",
             None),
    DeckItem("info_density", "formulas", "Information density: entropy (with compression), lexical "
             "diversity (TTR, vocd-D, HD-D, MTLD), readability (Flesch Reading Ease, Flesch-Kincaid Grade)"),
]


# ------------------------------------------------------------------------------- helpers for tables
class PM(NamedTuple):
    """A value and its logged standard error, printed ``v ± s`` (``v`` alone when s is missing)."""

    value: Any
    stderr: Any = None


def select(rows: pd.DataFrame, table: str, metric: str | Iterable[str] | None = None,
           method: str | Iterable[str] | None = None, needs: Iterable[str] = ()) -> pd.DataFrame:
    """The rows of one results table (optionally some metrics/methods only); empty when the table or a
    needed column is absent."""
    if "table" not in rows or any(c not in rows for c in needs):
        return rows.iloc[0:0]
    t = rows[rows["table"] == table]
    if metric is not None:
        t = t[t["metric"].isin(as_tuple(metric))]
    if method is not None:
        t = t[t["method"].isin(as_tuple(method))]
    return t


def pm(rows: pd.DataFrame) -> pd.Series:
    """``PM(value, stderr)`` per row."""
    se = rows["stderr"] if "stderr" in rows else pd.Series(None, index=rows.index, dtype=object)
    return pd.Series([PM(v, s) for v, s in zip(rows["value"], se)], index=rows.index, dtype=object)


def pivot(rows: pd.DataFrame, index: Sequence[str], columns: str | Sequence[str] = "metric",
          values: str = "value", order: Sequence[str] | None = None, with_stderr: bool = False,
          prefix: str = "") -> pd.DataFrame:
    """Long rows -> a wide table, one cell per (index, column) pair. Never aggregates: two rows for one cell
    raise ValueError (pass a finer index). ``columns`` may be several columns (the new column's name joins
    their values with a space, e.g. ``"observed tor"``); ``order`` selects and orders the new columns;
    ``with_stderr`` makes cells ``PM(value, stderr)``; ``prefix`` is put before each new column's name."""
    index, cols = list(index), list(as_tuple(columns))
    cell = pm(rows) if with_stderr else rows[values]
    name = rows[cols].astype(str).agg(" ".join, axis=1) if len(rows) else pd.Series([], dtype=object)
    d = rows[index].assign(_col=name, _cell=cell)
    dup = d.duplicated(index + ["_col"])
    if dup.any():
        raise ValueError(f"pivot: {int(dup.sum())} row(s) share a cell of {index + cols}; the report "
                         "never averages: add the distinguishing column to the index")
    wide = d.pivot(index=index, columns="_col", values="_cell")
    names = [c for c in (order or sorted(wide.columns, key=str)) if c in wide.columns]
    wide = wide[names]
    wide.columns = [f"{prefix}{c}" for c in names]
    return wide.reset_index()


def long(rows: pd.DataFrame, columns: dict[str, str], value: str = "value", n: bool = False) -> pd.DataFrame:
    """Rows as they are: ``columns`` maps new names to row columns (``"p.tau"``, ``"method"``), then the
    value cell named ``value`` (``PM(value, stderr)``) and, with ``n``, the row's n."""
    out = pd.DataFrame({label: rows[col].to_numpy() if col in rows else None for label, col in columns.items()})
    out[value] = pm(rows).to_numpy()
    if n:
        out["n"] = rows["n"].to_numpy() if "n" in rows else None
    return out


# -------------------------------------------------------------------------------------- formatting
def _is_missing(x: Any) -> bool:
    if x is None or x is pd.NA or x is pd.NaT:
        return True
    return isinstance(x, float) and not math.isfinite(x)


def fmt_number(x: Any) -> str:
    """The report's one number format: integers in full, other numbers to four significant digits."""
    if _is_missing(x):
        return EMPTY
    if isinstance(x, bool) or type(x).__name__ == "bool_":
        return "yes" if x else "no"
    f = float(x)
    if not math.isfinite(f):
        return EMPTY
    if f.is_integer() and abs(f) < 1e15:
        return str(int(f))
    return f"{f:.4g}"


def fmt_cell(x: Any) -> str:
    if isinstance(x, PM):
        v = fmt_number(x.value)
        return v if _is_missing(x.stderr) or v == EMPTY else f"{v} ± {fmt_number(x.stderr)}"
    if isinstance(x, str):
        return x.replace("|", "\\|").replace("\n", " ") or EMPTY
    if _is_missing(x):
        return EMPTY
    if isinstance(x, (int, float)) or hasattr(x, "dtype"):
        return fmt_number(x)
    return str(x).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame) -> str:
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(fmt_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _label(col: str) -> str:
    return col[2:] if col.startswith("p.") else col


def short_commit(commit: Any) -> str:
    return str(commit)[:7] if isinstance(commit, str) and commit else "unknown"


def _dirty(x: Any) -> bool:
    return str(x).strip().lower() in ("true", "1", "yes")


def source_lines(rows: pd.DataFrame) -> list[str]:
    """One ``Source:`` line per run of ``rows``: its tables, run id, commit, device, profile, start time."""
    if rows is None or rows.empty:
        return []
    cols = ["run_id", "git_commit", "git_dirty", "device", "profile", "start_time"]
    r = rows.reindex(columns=cols + ["table"]).drop_duplicates().astype(object).where(lambda d: d.notna(), "")
    out = []
    for key, g in sorted(r.groupby(cols, sort=False), key=lambda kv: (str(kv[0][5]), str(kv[0][0]))):
        run_id, commit, dirty, device, profile, start = key
        tables = ", ".join(f"`{t}`" for t in sorted(set(g["table"])))
        label = PROFILE_LABELS.get(str(profile), str(profile) or "unknown")
        state = " with uncommitted changes" if _dirty(dirty) else ""
        out.append(f"{SOURCE_PREFIX} {tables} · run `{run_id}` · commit `{short_commit(commit)}`{state} · "
                   f"{device or 'unknown device'} · profile {label} · started {start}")
    return out


# ------------------------------------------------------------------------------------------ building
@dataclass
class _Built:
    spec: TableSpec
    frame: pd.DataFrame | None
    shown: pd.DataFrame | None
    error: str | None = None


def split_by_experiment(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each experiment's rows, without the columns that are empty for it (as figure functions get them)."""
    if not len(df):
        return {}
    return {e: g.dropna(axis=1, how="all") for e, g in df.groupby("experiment", sort=True)}


def _rows_of(by_exp: dict[str, pd.DataFrame], experiment: str) -> pd.DataFrame:
    return by_exp.get(experiment, pd.DataFrame(columns=["experiment", "table"]))


def build_tables(by_exp: dict[str, pd.DataFrame]) -> list[_Built]:
    """Call every registered table function on its experiment's rows (in registration order)."""
    out = []
    for spec in TABLES.values():
        rows = _rows_of(by_exp, spec.experiment)
        if rows.empty:
            out.append(_Built(spec, None, None))
            continue
        try:
            res = spec.func(rows)
        except Exception as exc:  # one broken table must not hide the others
            out.append(_Built(spec, None, None, f"{type(exc).__name__}: {exc}"))
            continue
        frame, shown = res if isinstance(res, tuple) else (res, None)
        if frame is not None and shown is None:
            shown = rows[rows["table"].isin(spec.sources)]
        if frame is not None and frame.empty:
            frame = None
        out.append(_Built(spec, frame, shown))
    return out


def _figure_anchor(spec: FigureSpec) -> str:
    return f"figure-{spec.experiment}-{spec.name}"


def _figure_rows(by_exp: dict[str, pd.DataFrame], spec: FigureSpec) -> pd.DataFrame:
    rows = _rows_of(by_exp, spec.experiment)
    return rows[rows["table"].isin(spec.sources)] if spec.sources and len(rows) else rows


def _generic(rows: pd.DataFrame) -> pd.DataFrame | None:
    """A results table as-is: metrics as columns when that gives one cell per row, else long form."""
    t = rows.dropna(axis=1, how="all")
    params = sorted(c for c in t.columns if c.startswith("p."))
    index = ["method"] + params + (["seed"] if "seed" in t and t["seed"].nunique() > 1 else [])
    try:
        if t[index].isna().any().any():
            raise ValueError("missing index values")
        wide = pivot(t, index=index, columns="metric", with_stderr="stderr" in t)
    except (ValueError, TypeError):
        wide = None
    if wide is not None and len(wide) <= GENERIC_MAX_ROWS:
        return wide.rename(columns=_label)
    if len(t) > GENERIC_MAX_ROWS:
        return None
    cols = ["method", "metric"] + params + (["seed"] if "seed" in index else [])
    long = t[cols].assign(value=pm(t)).copy()
    if "n" in t:
        long["n"] = t["n"]
    return long.rename(columns=_label)


def _readme_link(experiment: str, repo: Path) -> str | None:
    for rel in (f"{experiment}/README.md", f"common/{experiment}/README.md"):
        if (repo / rel).is_file():
            return f"[{rel}](../{rel})"
    return None


def _deck_cell(item: DeckItem, tables: list[_Built], figures: dict[str, str] | None,
               by_exp: dict[str, pd.DataFrame]) -> tuple[str, str]:
    """(what regenerates the item here, what is not reproduced yet and who will)."""
    links, pending = [], []
    for b in tables:
        if item.key in b.spec.deck:
            text = f"table: {b.spec.title} ({b.spec.experiment})"
            if b.frame is not None:
                links.append(f"[{text}](#{b.spec.anchor})")
            else:
                pending.append(f"{text}: no rows yet")
    for spec in FIGURES.values():
        if item.key in spec.deck:
            text = f"figure: {spec.title} ({spec.experiment})"
            if _figure_ok(spec, figures, by_exp):
                links.append(f"[{text}](#{_figure_anchor(spec)})")
            else:
                pending.append(f"{text}: not drawn yet")
    if item.kind == "schematic" and not links:
        return EMPTY, "nothing to regenerate (a schematic of the technique)"
    todo = pending + ([item.missing] if item.missing else [])
    got = "<br>".join(links) if links else "not yet reproduced"
    return got, ("not yet reproduced: " + "; ".join(todo)) if todo else EMPTY


def _figure_ok(spec: FigureSpec, figures: dict[str, str] | None, by_exp: dict[str, pd.DataFrame]) -> bool:
    if figures is None:  # figures not drawn in this call (tests): assume drawn when its rows exist
        return not _figure_rows(by_exp, spec).empty
    return figures.get(spec.key) == "written"


def build_report(df: pd.DataFrame, figures: dict[str, str] | None = None, repo: Path = REPO_ROOT) -> str:
    """The report's Markdown for the latest rows ``df`` (``latest_rows(load_results())``).

    ``figures`` maps figure keys (``exp/name``) to ``"written"``, ``"skipped"`` (rows absent) or
    ``"failed"``, as ``make_figures`` drew them; None links every figure whose rows exist."""
    return render_report(df, figures, repo)[0]


def render_report(df: pd.DataFrame, figures: dict[str, str] | None = None, repo: Path = REPO_ROOT
                  ) -> tuple[str, list[str]]:
    """``(markdown, failures)``: failures are ``key: error`` of the table functions that raised."""
    if len(df):
        df = df.sort_values(["experiment", "table", "method", "metric", "record_id"], kind="stable")
    by_exp = split_by_experiment(df)
    tables = build_tables(by_exp)
    experiments = sorted((set(df["experiment"]) if len(df) else set())
                         | {b.spec.experiment for b in tables} | {s.experiment for s in FIGURES.values()})
    out = ["# Results report", "",
           "Generated by `make figures` (`results/make_figures.py`) from `results/results.csv`; do not edit by "
           "hand. Every number below is a value, standard error, n, seed or parameter of a row of "
           "`results.csv` (the latest row of each experiment, table, method, metric, parameters and seed, as "
           "the figures use), printed with one rule: integers in full, other numbers to four significant "
           "digits; `v ± s` is a row's value and the standard error the experiment logged with it; "
           f"{EMPTY} marks a missing or non-finite value. Nothing is computed from the rows (no means, ratios "
           "or differences): a table shows only what an experiment logged.",
           "",
           "Under every table and figure, `Source:` lines name the runs its rows come from: run id, git "
           "commit (and whether the working tree had uncommitted changes), device, profile and start time. "
           "Profile quick is a smoke-test size for a small CPU machine, not the papers' scale; paper is the "
           "GPU-sized profile. A run of your own shows up with your commit, device and start time (and in "
           "[Runs](#runs)); `git status results/runs` lists the run folders that are not committed.",
           "", "## Contents", "", "- [The slide deck, item by item](#deck)"]
    out += [f"- [{e}](#{e})" for e in experiments] + ["- [Runs](#runs)", ""]
    out += _deck_section(tables, figures, by_exp)
    for e in experiments:
        out += _experiment_section(e, by_exp, tables, figures, repo)
    out += _runs_section(df)
    failures = [f"{b.spec.key}: {b.error}" for b in tables if b.error]
    return "\n".join(out).rstrip() + "\n", failures


def _deck_section(tables: list[_Built], figures: dict[str, str] | None,
                  by_exp: dict[str, pd.DataFrame]) -> list[str]:
    rows = []
    for item in DECK:
        got, missing = _deck_cell(item, tables, figures, by_exp)
        rows.append({"deck item (in the deck's order)": item.title, "kind": item.kind,
                     "regenerated here": got, "not yet reproduced (who will)": missing,
                     "note": item.note or EMPTY})
    frame = pd.DataFrame(rows)
    # links hold Markdown: keep their brackets, escape only pipes (fmt_cell does that)
    return ['<a id="deck"></a>', "## The slide deck, item by item", "",
            "The tables and figures of the project's slide deck (`../shared/seeds/002_*.txt`) in the deck's "
            "order, each with its regenerated counterpart in this report or what is still missing. The deck's "
            "own numbers are not repeated here (this report prints only numbers from `results.csv`).", "",
            markdown_table(frame), ""]


def _experiment_section(e: str, by_exp: dict[str, pd.DataFrame], tables: list[_Built],
                        figures: dict[str, str] | None, repo: Path) -> list[str]:
    rows = _rows_of(by_exp, e)
    out = [f'<a id="{e}"></a>', f"## {e}", ""]
    link = _readme_link(e, repo)
    if link:
        out += [f"Methods, set-up and discussion: {link}.", ""]
    if rows.empty:
        return out + ["No rows in `results.csv` yet.", ""]
    mine = [b for b in tables if b.spec.experiment == e]
    for b in mine:
        out += [f'<a id="{b.spec.anchor}"></a>', f"### {b.spec.title}", ""]
        if b.spec.note:
            out += [b.spec.note, ""]
        if b.error:
            out += [f"Could not be built ({b.error.splitlines()[0][:200]}); see the output of `make figures`.", ""]
        elif b.frame is None:
            out += ["The rows this table needs are not in `results.csv` yet.", ""]
        else:
            out += [markdown_table(b.frame), ""] + [f"{s}  " for s in source_lines(b.shown)] + [""]
    figs = [s for s in FIGURES.values() if s.experiment == e]
    if figs:
        out += [f"### Figures ({e})", ""]
        for spec in figs:
            out += [f'<a id="{_figure_anchor(spec)}"></a>', f"#### {spec.title}", ""]
            if _figure_ok(spec, figures, by_exp):
                out += [f"![{spec.title}](figures/{e}/{spec.name}.png)", ""]
                out += [f"{s}  " for s in source_lines(_figure_rows(by_exp, spec))] + [""]
            elif figures is not None and figures.get(spec.key) == "failed":
                out += ["Drawing it failed; see the output of `make figures`.", ""]
            else:
                out += ["Not drawn: the rows it needs are not in `results.csv` yet.", ""]
    out += _other_tables(e, rows, mine)
    return out


def _other_tables(e: str, rows: pd.DataFrame, mine: list[_Built]) -> list[str]:
    covered = {t for b in mine for t in b.spec.sources}
    figured = {t for s in FIGURES.values() if s.experiment == e for t in s.sources}
    rest = sorted(set(rows["table"]) - covered)
    if not rest:
        return []
    out = [f"### Other rows of {e}", "",
           "Results tables that no registered report table shows, printed as logged (method, parameters, "
           "metrics) when small; larger ones are in `results.csv`"
           + (" and the figures above." if figured & set(rest) else "."), ""]
    big = []
    for t in rest:
        g = _generic(rows[rows["table"] == t])
        if g is None:
            big.append(t)
            continue
        out += [f'<a id="rows-{e}-{t}"></a>', f"#### `{t}`", "", markdown_table(g), ""]
        out += [f"{s}  " for s in source_lines(rows[rows["table"] == t])] + [""]
    if big:
        out += ["Only in `results.csv`" + (" and the figures" if figured & set(big) else "") + ": "
                + ", ".join(f"`{t}`" for t in big) + ".", ""]
    return out


def _runs_section(df: pd.DataFrame) -> list[str]:
    out = ['<a id="runs"></a>', "## Runs", ""]
    if not len(df):
        return out + ["No rows in `results.csv` yet.", ""]
    cols = ["experiment", "run_id", "profile", "git_commit", "git_dirty", "device", "start_time"]
    runs = (df.reindex(columns=cols).astype(object).where(lambda d: d.notna(), "").drop_duplicates()
            .sort_values(["experiment", "start_time", "run_id"], kind="stable"))
    frame = pd.DataFrame({
        "experiment": runs["experiment"], "run": [f"`{r}`" for r in runs["run_id"]],
        "profile": [PROFILE_LABELS.get(str(p), str(p)) for p in runs["profile"]],
        "commit": [f"`{short_commit(c)}`" for c in runs["git_commit"]],
        "uncommitted changes": ["yes" if _dirty(d) else "no" for d in runs["git_dirty"]],
        "device": runs["device"], "started": runs["start_time"]})
    return out + ["The runs whose rows this report shows (a rerun replaces the rows it repeats).", "",
                  markdown_table(frame), ""]


def write_report(root: Path, df: pd.DataFrame, figures: dict[str, str] | None = None
                 ) -> tuple[Path, list[str]]:
    """Write ``<root>/REPORT.md`` atomically; returns its path and the table failures (``key: error``)."""
    from common.results import atomic_write_text

    path = Path(root) / "REPORT.md"
    text, failures = render_report(df, figures)
    atomic_write_text(path, text)
    return path, failures
