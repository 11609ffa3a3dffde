"""exp_curriculum: corpus loading and the score stage end to end on a tiny data folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from exp_curriculum.corpus import CorpusConfig, load_corpus, pack_paragraphs, strip_gutenberg

EN = ["The committee met on Tuesday to discuss the budget for the new library. " * 6,
      "A small dog ran across the park, chasing a red ball that bounced over the grass. " * 6]
FR = ("*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\n\n"
      + "\n\n".join(["L'homme marchait lentement le long de la rivière, et qu'il pleuve ou non, il rêvait. " * 4,
                     "Le soleil se levait sur la ville endormie; les rues étaient encore vides. " * 4])
      + "\n\n*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\nlicence text")


@pytest.fixture()
def data_dir(tmp_path):
    (tmp_path / "text/en/c4").mkdir(parents=True)
    (tmp_path / "text/fr/gutenberg").mkdir(parents=True)
    (tmp_path / "text/en/c4/c4_demo.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in EN + EN[:1]))
    (tmp_path / "text/fr/gutenberg/test.txt").write_text(FR, encoding="utf-8")
    return tmp_path


def test_corpus_metadata_and_gutenberg_stripping(data_dir):
    ds = load_corpus(data_dir, CorpusConfig(doc_chars=600, min_chars=100))
    assert set(ds["language"]) == {"en", "fr"} and set(ds["genre"]) == {"web", "literature"}
    fr = [t for t, lg in zip(ds["text"], ds["language"]) if lg == "fr"]
    assert fr and not any("GUTENBERG" in t or "licence" in t for t in fr)
    assert strip_gutenberg(FR).strip().startswith("L'homme")
    assert all(len(c) < 700 for c in pack_paragraphs(FR, 600))


def test_corpus_bad_jsonl_names_file_and_line(data_dir):
    p = data_dir / "text/en/c4/c4_demo.jsonl"
    p.write_text(p.read_text() + "\n{not json")
    with pytest.raises(ValueError, match=r"c4_demo.jsonl:4"):
        load_corpus(data_dir)


def test_score_stage_end_to_end(data_dir, tmp_path, monkeypatch):
    from exp_curriculum import run

    monkeypatch.setenv("LLM4ALL_RESULTS", str(tmp_path / "results"))
    out = tmp_path / "out"
    run.main(["--profile", "quick", "--data-dir", str(data_dir), f"output_dir={out}", "num_proc=1",
              "semdedup.enabled=false", "model_scores.enabled=false", "diversity.enabled=false",
              "corpus.doc_chars=600", "corpus.min_chars=100"])
    scores = pd.read_parquet(out / "scores.parquet")
    assert {"mtld", "fre", "deflate_ratio_lennorm", "minhash_keep"} <= set(scores.columns)
    assert (~scores["minhash_keep"]).sum() == 1          # the repeated C4 line
    res = pd.read_csv(tmp_path / "results/results.csv")
    assert {"curriculum_scores", "curriculum_corr", "curriculum_dedup"} <= set(res["table"])


def test_bad_config_exits_2(data_dir, tmp_path, monkeypatch):
    from exp_curriculum import run

    monkeypatch.setenv("LLM4ALL_RESULTS", str(tmp_path / "results"))
    with pytest.raises(SystemExit) as e:
        run.main(["--profile", "quick", "--data-dir", str(data_dir), "minhash.threshold=1.5"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        run.main(["--profile", "quick", "--data-dir", str(data_dir), "no_such_key=1"])
    assert e.value.code == 2
