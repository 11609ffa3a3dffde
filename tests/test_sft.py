"""common.sft and the fine-tuning side of common.train: answer-only masking, LoRA, trainable-only
save/load, trajectory snapshots, SIGKILL resume of a LoRA run, WSD schedule, validation curves."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.models import build_causal_lm, train_bpe_tokenizer
from common.sft import (
    IGNORE_INDEX,
    SFTConfig,
    answer_loss,
    apply_lora,
    encode_example,
    encode_examples,
    finetune,
    format_prompt,
    load_trainable,
    make_collator,
    save_trainable,
)
from common.train import (
    TrainConfig,
    latest_checkpoint,
    list_snapshots,
    load_snapshot_optimizer,
    load_snapshots,
    snapshot_info,
    train,
    trainable_names,
)
from tests.conftest import PYTHON, REPO, subprocess_env
from tests.helpers.toy_sft import arc_examples

TOY = str(REPO / "tests" / "helpers" / "toy_sft.py")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def arc(data_root):
    return arc_examples(600)


@pytest.fixture(scope="module")
def bpe_dir(arc, tmp_path_factory):
    """A byte-level BPE tokenizer trained here on ARC text (no chat template: the plain template)."""
    out = tmp_path_factory.mktemp("bpe")
    texts = [f"{e['instruction']}\n{e['input']}\n{e['output']}" for e in arc]
    train_bpe_tokenizer(texts, vocab_size=400, save_dir=out)
    return out


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_dir)


@pytest.fixture(scope="module")
def smollm():
    from common.models import ModelNotAvailableError, load_causal_lm

    try:
        return load_causal_lm("smollm2-135m-instruct")
    except ModelNotAvailableError as exc:
        pytest.skip(str(exc))


def tiny_llama(tok, seed: int = 0):
    torch.manual_seed(seed)
    return build_causal_lm("llama", vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, max_seq_len=128)


# ---------------------------------------------------------------------------------- masking
def _check_masking(tok, examples, cfg, prompt_ids_of, eos_text):
    """Labels are -100 exactly on the prompt (its tokens as the tokenizer gives them on their own) and on
    padding; the rest is the answer + EOS, token for token."""
    rows = encode_examples(tok, examples, cfg)
    batch = make_collator(tok)(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i, ex in enumerate(examples):
        ref_prompt = prompt_ids_of(ex)
        n = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        assert ids[:len(ref_prompt)] == ref_prompt
        masked = [j for j, lab in enumerate(labels) if lab == IGNORE_INDEX]
        assert masked == list(range(len(ref_prompt))) + list(range(n, len(labels)))
        answer = labels[len(ref_prompt):n]
        assert answer == ids[len(ref_prompt):n] and answer[-1] == tok.eos_token_id
        assert tok.decode(answer, clean_up_tokenization_spaces=False) == ex["output"] + eos_text
        assert all(x == tok.pad_token_id for x in ids[n:])
    assert (batch["attention_mask"] == 0).any(), "no padding in the batch: padding was not tested"


def test_masking_smollm2_chat_template(smollm, arc):
    _, tok = smollm
    assert tok.chat_template
    examples = arc[:12]
    cfg = SFTConfig(max_len=4096)

    def prompt_ids(ex):  # transformers' own tokenisation of the generation prompt
        user = f"{ex['instruction']}\n\n{ex['input']}"
        out = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                      tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    _check_masking(tok, examples, cfg, prompt_ids, "<|im_end|>")
    prompt, _ = format_prompt(tok, examples[0], cfg)
    assert prompt.endswith("<|im_start|>assistant\n") and examples[0]["instruction"] in prompt


def test_masking_bpe_plain_template(bpe, arc):
    assert not bpe.chat_template
    examples = arc[:12]
    cfg = SFTConfig(max_len=4096)

    def prompt_ids(ex):
        text = f"### Instruction:\n{ex['instruction']}\n\n### Input:\n{ex['input']}\n\n### Response:\n"
        return bpe(text, add_special_tokens=False)["input_ids"]

    _check_masking(bpe, examples, cfg, prompt_ids, "<|endoftext|>")


def test_bpe_merge_across_the_boundary_keeps_the_prompt_exact(bpe):
    """A prompt ending inside a word: the joint tokenisation merges across the boundary, so the answer is
    tokenised on its own and the prompt keeps exactly its own tokens."""
    cfg = SFTConfig(template="plain", plain_template="{instruction} The answer i", max_len=4096)
    ex = {"instruction": "Which is hot?", "output": "s the sun"}
    prompt, answer = format_prompt(bpe, ex, cfg)
    p = bpe(prompt, add_special_tokens=False)["input_ids"]
    joint = bpe(prompt + answer, add_special_tokens=False)["input_ids"]
    assert joint[:len(p)] != p, "no merge across the boundary: the case is not exercised"
    row = encode_example(bpe, ex, cfg)
    assert row["input_ids"][:len(p)] == p and row["labels"][:len(p)] == [IGNORE_INDEX] * len(p)
    assert bpe.decode(row["input_ids"], clean_up_tokenization_spaces=False) == prompt + answer + "<|endoftext|>"


def test_truncation_keeps_answer_and_prompt_end(bpe, arc):
    cfg = SFTConfig(max_len=24)
    row = encode_example(bpe, arc[0], cfg)
    full = encode_example(bpe, arc[0], SFTConfig(max_len=4096))
    n_answer = sum(lab != IGNORE_INDEX for lab in row["labels"])
    assert len(row["input_ids"]) == 24 and n_answer >= 12
    n_prompt = 24 - n_answer
    full_prompt = [t for t, lab in zip(full["input_ids"], full["labels"]) if lab == IGNORE_INDEX]
    assert row["input_ids"][:n_prompt] == full_prompt[-n_prompt:]  # cut from the left


def test_answer_loss_equals_per_example_log_probs(bpe, arc):
    """Padded, batched answer_loss == sum of -log p(answer tokens | prefix) over unpadded single examples."""
    model = tiny_llama(bpe).eval()
    examples = arc[:6]
    got = answer_loss(model, bpe, examples, batch_size=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            prompt, answer = format_prompt(bpe, ex)
            p = bpe(prompt, add_special_tokens=False)["input_ids"]
            a = bpe(answer, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
            ids = torch.tensor([p + a])
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            total -= sum(logp[len(p) - 1 + k, tok].item() for k, tok in enumerate(a))
            count += len(a)
    assert got == pytest.approx(total / count, abs=1e-5)


# ------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("arch,targets", [
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("opt", {"q_proj", "k_proj", "v_proj", "out_proj"}),
    ("gpt2", {"c_attn", "c_proj"}),
])
def test_lora_default_targets_and_unmerged_equals_merged(arch, targets):
    torch.manual_seed(0)
    base = build_causal_lm(arch, vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
    ids = torch.randint(2, 64, (2, 10))
    with torch.no_grad():
        ref = base.eval()(ids).logits
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, seed=0).eval()
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == targets
    if arch == "gpt2":  # attention only: the MLP's c_proj keeps no adapter
        assert not any(".mlp." in n for n, m in model.named_modules() if hasattr(m, "lora_A"))
    assert all("lora_" in n for n in trainable_names(model))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-6)  # lora_B = 0 at init
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        unmerged = model(ids).logits
        merged = model.merge_and_unload()(ids).logits  # fan_in_fan_out wrong -> shapes or values differ
    assert not torch.allclose(unmerged, ref, atol=1e-4)
    assert torch.allclose(unmerged, merged, atol=1e-5)


def test_save_load_trainable_is_bit_exact(tmp_path, bpe):
    from safetensors import safe_open

    model = apply_lora(tiny_llama(bpe, seed=0), r=4, alpha=8, dropout=0.1, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    path = save_trainable(model, tmp_path / "adapter.safetensors")
    names = trainable_names(model)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(names)
    assert all("lora_" in n for n in names) and len(names) == 2 * 4 * 2  # A, B x q/k/v/o x 2 layers

    fresh = apply_lora(tiny_llama(bpe, seed=0), r=4, alpha=8, dropout=0.1, seed=1)
    before, after = dict(model.named_parameters()), dict(fresh.named_parameters())
    assert not all(torch.equal(before[n], after[n]) for n in names)
    assert load_trainable(fresh, path) == sorted(names)
    assert all(torch.equal(before[n], after[n]) for n in names)

    other = apply_lora(tiny_llama(bpe, seed=0), r=2, alpha=8, dropout=0.1)
    with pytest.raises(ValueError, match="shape"):
        load_trainable(other, path)


@pytest.mark.slow
def test_lora_finetune_smollm2_lowers_heldout_answer_loss(smollm, arc, tmp_path):
    model, tok = smollm
    cfg = SFTConfig(r=8, alpha=16, dropout=0.0, lr=2e-3, epochs=1, batch_size=8, warmup_ratio=0.0,
                    lr_schedule="constant", max_len=64, system_prompt="", log_with="none")
    short = [e for e in arc if len(encode_example(tok, e, SFTConfig(max_len=10**6, system_prompt=""))
                                    ["input_ids"]) <= 64][:96]
    train_ex, held = short[:64], short[64:]
    assert len(held) == 32
    before = answer_loss(model, tok, held, cfg)
    res = finetune(model, tok, train_ex, cfg, tmp_path)
    after = answer_loss(res.model, tok, held, cfg)
    assert res.step == 8  # 64 examples / batch 8, one epoch
    assert after < 0.8 * before, (before, after)
    ckpt = latest_checkpoint(tmp_path)
    assert (ckpt / "model.safetensors").stat().st_size < 20e6  # adapters only, not the 540 MB base


# ---------------------------------------------------------------------- snapshots / subset
def test_snapshots_survive_rotation_and_hold_only_trainable(bpe, tmp_path):
    from safetensors import safe_open

    model = tiny_llama(bpe)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".layers.1." not in n}
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen: dict[int, dict] = {}
    lrs: dict[int, float] = {}

    def record(event, info):
        if event == "step_end":
            lrs[info["step"]] = info["lr"]
        if event == "step_end" and info["step"] in (3, 4):
            seen[info["step"]] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    # 16 examples / batch 4: an epoch is 4 steps; snapshots every 3 steps, at epoch ends and the end
    cfg = TrainConfig(max_steps=7, batch_size=4, lr=1e-2, snapshot_every=3, snapshot_epochs=True,
                      snapshot_optimizer=True, checkpoint_every=1, keep_checkpoints=1,
                      trainable=("model.layers.1.*",), log_with="none")
    data = encode_examples(bpe, arc_examples(16), SFTConfig(max_len=64))
    params = [p for n, p in model.named_parameters() if n.startswith("model.layers.1.")]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    res = train(model, data, cfg, tmp_path, collate_fn=make_collator(bpe), callbacks=[record], optimizer=opt)
    assert res.step == 7
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_00000007"]
    assert [s for s, _ in list_snapshots(tmp_path)] == [0, 3, 4, 6, 7]
    trainable = sorted(trainable_names(model))
    assert trainable and all(n.startswith("model.layers.1.") for n in trainable)
    snaps = dict(load_snapshots(tmp_path))
    assert all(sorted(s) == trainable for s in snaps.values())
    assert all(torch.equal(snaps[0][n], init[n]) for n in trainable)
    for step in (3, 4):
        assert all(torch.equal(snaps[step][n], seen[step][n]) for n in trainable)
    final = dict(model.named_parameters())
    assert all(torch.equal(snaps[7][n], final[n]) for n in trainable)
    assert not torch.equal(snaps[7][trainable[0]], snaps[0][trainable[0]])
    assert all(torch.equal(final[n], t) for n, t in frozen_before.items())  # frozen really frozen
    assert snapshot_info(tmp_path, 4)["epoch"] == 1 and snapshot_info(tmp_path, 3)["epoch"] == 0
    # the rate of update k (1-based) of a cosine schedule without warm-up, from its formula
    cosine = {k: cfg.lr * 0.5 * (1 + math.cos(math.pi * (k - 1) / 7)) for k in range(1, 8)}
    assert all(math.isclose(lrs[k], cosine[k], rel_tol=1e-9, abs_tol=1e-15) for k in cosine)
    # mean_lr: the mean rate of the updates since the previous snapshot (0 | 1-3 | 4 | 5-6 | 7)
    since = {0: [1], 3: [1, 2, 3], 4: [4], 6: [5, 6], 7: [7]}
    for step, ks in since.items():
        assert math.isclose(snapshot_info(tmp_path, step)["mean_lr"], sum(cosine[k] for k in ks) / len(ks),
                            rel_tol=1e-9, abs_tol=1e-15), step
    moments = load_snapshot_optimizer(tmp_path, 7)
    assert sorted(moments) == trainable
    for n in trainable:
        assert torch.equal(moments[n]["exp_avg"], opt.state[final[n]]["exp_avg"])
        assert torch.equal(moments[n]["exp_avg_sq"], opt.state[final[n]]["exp_avg_sq"])
    assert load_snapshot_optimizer(tmp_path, 0) == {}
    with safe_open(str(tmp_path / "step_00000007" / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == trainable  # frozen weights are not copied into checkpoints


def test_trainable_pattern_matching_nothing_is_an_error(bpe, tmp_path):
    cfg = TrainConfig(max_steps=1, batch_size=2, trainable=("model.layer.1.*",), log_with="none")
    with pytest.raises(ValueError, match="match no parameter"):
        train(tiny_llama(bpe), [], cfg, tmp_path)


@pytest.mark.slow
def test_sigkill_lora_run_resumes_bit_exactly(bpe_dir, data_root, tmp_path):
    def run(out: Path, *args: str) -> dict:
        proc = subprocess.run([PYTHON, TOY, str(out), str(bpe_dir), *args], env=subprocess_env(),
                              timeout=240, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "final.json").read_text())

    ref = run(tmp_path / "ref")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([PYTHON, TOY, str(killed), str(bpe_dir), "--sleep", "0.4"], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ckpt_step() -> int:
        c = latest_checkpoint(killed)
        return int(c.name.split("_")[1]) if c else -1

    deadline = time.time() + 180
    while time.time() < deadline and ckpt_step() < 6:
        assert proc.poll() is None, "toy run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.json").exists(), "the run finished before SIGKILL: nothing was tested"
    assert 6 <= ckpt_step() < 12
    kept = {s: (p.stat().st_ino, p.stat().st_mtime_ns) for s, p in list_snapshots(killed)}
    assert 0 in kept and 6 in kept

    res = run(killed)
    assert res["resumed_from"] is not None and res["resumed_from"] >= 6
    assert res["trainable_sha256"] == ref["trainable_sha256"]
    assert res["final_loss"] == ref["final_loss"]
    assert res["losses"] == ref["losses"][res["resumed_from"]:]
    assert res["evals"] == ref["evals"] and [s for s, _ in ref["evals"]] == [0, 4, 8, 12]
    # snapshots: none lost, none rewritten, all equal to the uninterrupted run's
    assert [s for s, _ in list_snapshots(killed)] == [0, 3, 6, 9, 12]
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == kept[s] for s, p in list_snapshots(killed) if s in kept)
    for (s1, a), (s2, b) in zip(load_snapshots(killed), load_snapshots(tmp_path / "ref")):
        assert s1 == s2 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ma, mb = load_snapshot_optimizer(killed, s1), load_snapshot_optimizer(tmp_path / "ref", s1)
        assert ma.keys() == mb.keys() and all(torch.equal(ma[n][k], mb[n][k]) for n in ma for k in ma[n])
        assert snapshot_info(killed, s1) == snapshot_info(tmp_path / "ref", s1)


# ------------------------------------------------------------------------- schedule / curves
def _linear_task(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return list(zip(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0])))


def _mse(m, batch):
    xb, yb = batch
    return F.mse_loss(m(xb).squeeze(-1), yb)


def test_wsd_schedule_matches_formula(tmp_path):
    lrs = {}
    cfg = TrainConfig(max_steps=20, batch_size=4, lr=0.5, warmup_steps=4, lr_schedule="wsd",
                      decay_fraction=0.25, log_with="none")
    train(torch.nn.Linear(4, 1), _linear_task(16, 0), cfg, tmp_path, loss_fn=_mse,
          callbacks=[lambda e, i: lrs.__setitem__(i["step"], i["lr"]) if e == "step_end" else None])
    warm, total, decay = 4, 20, 5

    def factor(k: int) -> float:  # update k (1-based) uses the schedule at k - 1 completed updates
        s = k - 1
        if s < warm:
            return s / warm
        if s < total - decay:
            return 1.0
        return 1.0 - (s - (total - decay)) / decay

    assert sorted(lrs) == list(range(1, 21))
    for k, lr in lrs.items():
        assert lr == pytest.approx(0.5 * factor(k), abs=1e-12), k
    assert lrs[5] == lrs[15] == 0.5 and lrs[16] == pytest.approx(0.5) and lrs[20] == pytest.approx(0.1)


def test_eval_curve_rows_events_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from common.results import Run, iter_records

    events = []
    train_data, val_data = _linear_task(16, 0), _linear_task(10, 1)
    run = Run("test_sft", config={}, seed=0, root=tmp_path / "results")
    cfg = TrainConfig(max_steps=12, batch_size=4, eval_batch_size=4, lr=0.05, lr_schedule="constant",
                      eval_every=5, log_every=4)
    model = torch.nn.Linear(4, 1)
    res = train(model, train_data, cfg, tmp_path / "out", loss_fn=_mse, eval_dataset=val_data, run=run,
                curve_table="curve_test", curve_params={"lr": 0.05},
                callbacks=[lambda e, i: events.append((e, i))])
    run.finish()
    assert [s for s, _ in res.evals] == [0, 5, 10, 12]
    x, y = (torch.stack(t) for t in zip(*val_data))
    with torch.no_grad():  # exact mean over all 10 examples, though the last batch holds 2
        assert res.evals[-1][1] == pytest.approx(F.mse_loss(model(x).squeeze(-1), y).item(), rel=1e-6)
    assert [(i["step"], i["epoch"]) for e, i in events if e == "epoch_end"] == [(4, 0), (8, 1), (12, 2)]
    assert [i["step"] for e, i in events if e == "eval"] == [0, 5, 10, 12]

    rows = [rec for _, rec in iter_records(tmp_path / "results")]
    val = sorted((r["params"]["step"], r["value"]) for r in rows if r["metric"] == "val_loss")
    assert [s for s, _ in val] == [0, 5, 10, 12]
    assert [v for _, v in val] == pytest.approx([v for _, v in res.evals], rel=1e-12)
    assert all(r["table"] == "curve_test" and r["params"]["lr"] == 0.05 for r in rows)
    train_rows = {r["params"]["step"]: r["value"] for r in rows if r["metric"] == "train_loss"}
    assert sorted(train_rows) == [4, 8, 12]
    assert train_rows[8] == pytest.approx(sum(res.losses[4:8]) / 4)

    logs = list((tmp_path / "out" / "tb").rglob("events.out.tfevents.*"))
    assert logs, "no TensorBoard event file"
    acc = EventAccumulator(str(tmp_path / "out" / "tb" / "out")).Reload()
    assert [e.step for e in acc.Scalars("val_loss")] == [0, 5, 10, 12]
    assert [e.value for e in acc.Scalars("val_loss")] == pytest.approx([v for _, v in res.evals], rel=1e-6)
    assert [e.step for e in acc.Scalars("train_loss")] == list(range(1, 13))
    assert math.isclose(acc.Scalars("lr")[0].value, 0.05, rel_tol=1e-6)
