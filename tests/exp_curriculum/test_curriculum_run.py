"""exp_curriculum: corpus loading, the stages end to end on a tiny data folder, stages alone from disk,
profiles holding only differences from the defaults."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from common.config import to_dict
from common.results import load_results
from common.stages import Pipeline
from exp_curriculum.config import Config
from exp_curriculum.corpus import CorpusConfig, load_corpus, pack_paragraphs, strip_gutenberg

EN = ["The committee met on Tuesday to discuss the budget for the new library. " * 6,
      "A small dog ran across the park, chasing a red ball that bounced over the grass. " * 6]
FR = ("*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\n\n"
      + "\n\n".join(["L'homme marchait lentement le long de la rivière, et qu'il pleuve ou non, il rêvait. " * 4,
                     "Le soleil se levait sur la ville endormie; les rues étaient encore vides. " * 4])
      + "\n\n*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\nlicence text")
RUN = Path(__file__).resolve().parents[2] / "exp_curriculum" / "run.py"
CONFIGS = RUN.parent / "configs"
STAGES = ["metrics", "dedup", "model_scores", "diversity", "summary"]
# tiny and model-free: the runs below stay fast
SMALL = ["num_proc=1", "threads=1", "semdedup.enabled=false", "model_scores.enabled=false",
         "diversity.enabled=false", "corpus.doc_chars=600", "corpus.min_chars=100",
         "stages=[metrics,dedup,model_scores,diversity,summary]"]   # part 2's study: tests/exp_curriculum/test_study_*


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


def exit_code(argv: list[str]) -> int:
    """run.main's exit code: config errors exit inside the parser (SystemExit), the rest are returned."""
    from exp_curriculum import run

    try:
        return run.main(argv)
    except SystemExit as e:
        return e.code


def only_file(root: Path, stage: str, name: str) -> Path:
    found = list((root / "exp_curriculum" / stage).glob(f"*/{name}"))
    assert len(found) == 1, found
    return found[0]


def table_rows(results: Path) -> list[tuple]:
    """The result rows except per-run timing, in a fixed order."""
    df = load_results(results, expand_params=False)
    df = df[~df["table"].isin(["stage_time", "curriculum_runtime"])]
    return sorted(zip(df["table"], df["method"], df["metric"], df["params"].astype(str), df["value"]))


def run_cli(data_dir: Path, out: Path, res: Path, *overrides: str, stage: str | None = None,
            force: bool = False) -> subprocess.CompletedProcess:
    from tests.conftest import REPO, subprocess_env

    env = subprocess_env(LLM4ALL_OUTPUTS=str(out), LLM4ALL_RESULTS=str(res), LLM4ALL_DATA=str(data_dir))
    # options before the overrides: common.stages appends --stage as an override after the last argument
    opts = [*(["--stage", stage] if stage else []), *(["--force"] if force else [])]
    r = subprocess.run([sys.executable, str(RUN), "--profile", "quick", *opts, *SMALL, *overrides], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_stages_end_to_end(data_dir, tmp_path):
    out, res = tmp_path / "out", tmp_path / "results"
    assert exit_code(["--profile", "quick", "--data-dir", str(data_dir), "--results-dir", str(res),
                      f"outputs_dir={out}", *SMALL]) == 0
    scores = pd.read_parquet(only_file(out, "summary", "scores.parquet"))
    assert {"mtld", "fre", "deflate_ratio_lennorm", "minhash_keep"} <= set(scores.columns)
    assert (~scores["minhash_keep"]).sum() == 1          # the repeated C4 line
    assert "text" not in scores and scores["id"].is_unique
    metrics = pd.read_parquet(only_file(out, "metrics", "metrics.parquet"))
    assert metrics["id"].tolist() == scores["id"].tolist() and metrics["text"].str.len().min() >= 100
    # disabled parts leave markers, not failures
    assert json.loads(only_file(out, "model_scores", "model_scores.json").read_text())["enabled"] is False
    assert json.loads(only_file(out, "diversity", "diversity.json").read_text())["groups"] == {}
    assert list(pd.read_parquet(only_file(out, "dedup", "dedup.parquet")).columns) == ["id", "minhash_keep"]
    res_df = pd.read_csv(res / "results.csv")
    assert {"curriculum_scores", "curriculum_corr", "curriculum_dedup", "curriculum_runtime"} <= set(res_df["table"])
    dedup = res_df.query("table == 'curriculum_dedup'")
    assert dedup[["method", "value", "n"]].values.tolist() == [["minhash", 1, len(scores)]]


def run_here(data_dir: Path, out: Path, res: Path, *overrides: str, stage: str | None = None) -> None:
    """The same command in this process (cheaper than a fresh one where freshness is not the point)."""
    args = ["--profile", "quick", "--data-dir", str(data_dir), "--results-dir", str(res), "--outputs-dir", str(out)]
    assert exit_code([*args, *(["--stage", stage] if stage else []), *SMALL, *overrides]) == 0


@pytest.mark.slow
def test_stage_alone_in_fresh_process_then_skip(data_dir, tmp_path, capsys):
    # reference: every stage in one call (SemDeDup/D4/Density on, on a 2-cluster toy)
    sem = ["semdedup.enabled=true", "semdedup.n_clusters=2"]
    ref_out, ref_res = tmp_path / "ref_out", tmp_path / "ref_res"
    run_here(data_dir, ref_out, ref_res, *sem)
    # metrics, then dedup alone in a fresh process, then summary alone in another: each reads from disk
    out, res = tmp_path / "out", tmp_path / "res"
    run_here(data_dir, out, res, *sem, stage="metrics")
    r = run_cli(data_dir, out, res, *sem, stage="dedup")
    assert "metrics:" not in r.stdout and "stage 1/1 dedup: running" in r.stdout
    r = run_cli(data_dir, out, res, *sem, stage="summary")
    assert "metrics:" not in r.stdout and "dedup:" not in r.stdout    # complete inputs are not even considered
    assert "model_scores: input of a selected stage, missing for this config: running it" in r.stdout
    assert "stage 3/3 summary: running" in r.stdout
    assert table_rows(res) == table_rows(ref_res) and len(table_rows(res)) > 100
    scores = pd.read_parquet(only_file(out, "summary", "scores.parquet"))
    pd.testing.assert_frame_equal(scores, pd.read_parquet(only_file(ref_out, "summary", "scores.parquet")))
    assert scores["semdedup_keep"].notna().all() and scores["density"].gt(0).all()
    # a second call skips every stage and logs no new row (except stage timing)
    n_rows = len(load_results(res))
    capsys.readouterr()
    run_here(data_dir, out, res, *sem)
    assert capsys.readouterr().out.count(": skipped, complete in") == len(STAGES)
    assert len(load_results(res)) == n_rows


def test_hash_keys_exclude_resources():
    from exp_curriculum.run import STAGES as stage_list

    part1 = ["metrics", "dedup", "decontam", "model_scores", "diversity", "summary"]
    p = Pipeline("exp_curriculum", stage_list)
    assert p.names[: len(part1)] == part1 and all(n.startswith("study_") for n in p.names[len(part1):])
    base = to_dict(Config())
    resources = to_dict(Config(num_proc=7, threads=3, stages=["summary"], outputs_dir="/elsewhere"))
    assert all(p.key(s, base) == p.key(s, resources) for s in p.names)
    seed = to_dict(Config(seed=1))
    for unseeded in ("metrics", "decontam"):                       # the corpus, its metrics and overlaps
        assert p.key(unseeded, seed) == p.key(unseeded, base)
    assert all(p.key(s, seed) != p.key(s, base) for s in STAGES[1:])
    cfg = Config()
    cfg.model_scores.enabled = False
    changed = to_dict(cfg)
    assert [s for s in part1 if p.key(s, changed) != p.key(s, base)] == ["model_scores", "summary"]


def _leaves(node: dict, prefix: str = ""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("profile", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_profiles_hold_only_differences_from_the_defaults(profile):
    """One layer of defaults: every leaf of a profile YAML is a config key whose value differs from the
    dataclass default (read from the dataclass instance, not through common.config)."""
    data = yaml.safe_load((CONFIGS / profile).read_text()) or {}
    defaults = Config()
    for key, value in _leaves(data):
        node = defaults
        for part in key.split("."):
            assert dataclasses.is_dataclass(node) and hasattr(node, part), f"{profile}: unknown key {key}"
            node = getattr(node, part)
        assert value != node, f"{profile}: {key}: {value!r} is the default; delete it from the profile"


def test_bad_config_and_missing_data_exit_2(data_dir, tmp_path, monkeypatch, capsys):
    assert exit_code(["--profile", "quick", "--data-dir", str(data_dir), "minhash.threshold=1.5"]) == 2
    assert exit_code(["--profile", "quick", "--data-dir", str(data_dir), "no_such_key=1"]) == 2
    assert exit_code(["--profile", "quick", "--stage", "score"]) == 2       # the old single stage is gone
    capsys.readouterr()
    monkeypatch.setenv("LLM4ALL_DATA", str(tmp_path / "no_data"))
    assert exit_code(["--profile", "quick", *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no text folder") and "\n" not in err
