"""exp_distill_data.distill / project: the trajectory-matching inner loop against central finite differences
(float64, an attention kernel without transformers' fp32 softmax), N = 0, the loss at the start point, the
whole loop on real data with the experts' own rate (an SGD expert trained by common.train is reproduced by
the unrolled student), the regulariser and nearest-token projection on exact token rows, tokenizer round
trips, and a SIGKILLed distillation resuming to the uninterrupted result bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AttentionInterface

from common.models import build_causal_lm
from common.train import TrainConfig, load_snapshots, train, trainable_names
from exp_distill_data.distill import (
    DistillConfig,
    SyntheticSet,
    Trajectories,
    causal_lm_loss,
    distill,
    matching_loss,
    nearest_tokens,
    neighbour_loss,
    student_inputs,
    unroll,
)
from exp_distill_data.project import project_synthetic

VOCAB = 64
REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


def _eager_fp64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # eager attention with the softmax in the inputs' dtype: transformers' eager kernel computes it in
    # fp32, which would cap a float64 finite-difference check at fp32 precision
    w = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


AttentionInterface.register("eager_fp64", _eager_fp64)


def _lora_opt(dtype=torch.float64, attn="eager_fp64", seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    m = build_causal_lm("opt", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, attn_implementation=attn)
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                     target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    m = m.to(dtype).eval()
    m.requires_grad_(False)
    return m


def _synthetic(model, n=6, length=10, prompt=6, seed=0) -> SyntheticSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    mask = torch.ones(n, length, dtype=torch.long)
    mask[-1, -2:] = 0          # one padded row: padding is neither learnt nor labelled
    labels[-1, -2:] = -100
    learn = (labels == -100) & mask.bool()
    E = model.get_input_embeddings().weight
    return SyntheticSet(ids, labels, mask, learn, E.detach()[ids].clone())


def _params(model):
    names = set(trainable_names(model)) or {n for n, _ in model.named_parameters() if "lora_" in n}
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in names}


def test_inner_loop_gradient_matches_finite_differences_float64():
    model = _lora_opt()
    syn = _synthetic(model)
    E = model.get_input_embeddings().weight
    start = _params(model)
    g = torch.Generator().manual_seed(1)
    target = {k: v + 0.02 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in start.items()}
    lr = torch.tensor(0.5, dtype=torch.float64)
    rows = [torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5]), torch.tensor([0, 1, 5])]

    def loss(embeds, checkpoint=False):
        batches = [student_inputs(syn, embeds, E, r) for r in rows]
        return matching_loss(unroll(model, start, lr, batches, checkpoint), start, target)

    x = syn.embeds.clone().requires_grad_(True)
    grad, = torch.autograd.grad(loss(x), x)
    x2 = syn.embeds.clone().requires_grad_(True)
    grad_ckpt, = torch.autograd.grad(loss(x2, checkpoint=True), x2)
    assert torch.allclose(grad, grad_ckpt, rtol=1e-10, atol=1e-12)   # checkpointing changes memory, not maths
    h = 1e-5
    gen = torch.Generator().manual_seed(2)
    learnable = syn.learn_mask.nonzero().tolist()
    checked = 0
    for pick in torch.randperm(len(learnable), generator=gen)[:8].tolist():
        i, t = learnable[pick]
        d = int(torch.randint(0, x.shape[-1], (1,), generator=gen))
        e = syn.embeds.clone()
        e[i, t, d] += h
        up = float(loss(e))
        e[i, t, d] -= 2 * h
        down = float(loss(e))
        fd = (up - down) / (2 * h)
        assert abs(fd - float(grad[i, t, d])) <= 1e-3 * abs(fd) + 1e-9, (i, t, d, fd, float(grad[i, t, d]))
        checked += 1
    assert checked == 8
    # answer tokens and padding are fixed inputs: no gradient reaches their rows
    assert float(grad[~syn.learn_mask].abs().max()) == 0.0
    assert float(grad[syn.learn_mask].abs().max()) > 0.0


def test_zero_inner_steps_is_zero_displacement_and_loss_one():
    model = _lora_opt()
    start = _params(model)
    target = {k: v + 1.0 for k, v in start.items()}
    theta = unroll(model, start, torch.tensor(0.1, dtype=torch.float64), [])
    assert all(torch.equal(theta[k], start[k]) for k in start)
    assert float(matching_loss(theta, start, target)) == 1.0
    # one step moves the student; the loss changes
    syn = _synthetic(model)
    moved = unroll(model, start, torch.tensor(0.1, dtype=torch.float64),
                   [student_inputs(syn, syn.embeds, model.get_input_embeddings().weight)])
    assert sum(float((moved[k] - start[k]).abs().sum()) for k in start) > 0


def test_student_loss_is_transformers_causal_lm_loss():
    model = _lora_opt(dtype=torch.float32, attn="eager")
    syn = _synthetic(model)
    inputs = student_inputs(syn, syn.embeds, model.get_input_embeddings().weight)
    ours = causal_lm_loss(model, _params(model), inputs)
    theirs = model(**inputs).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)


def _expert(model, syn, steps, lr, out):
    """An SGD expert trained by common.train on the synthetic set's real tokens (full batch, constant rate,
    no clipping, snapshot every step)."""
    rows = [{"input_ids": syn.input_ids[i], "labels": syn.labels[i], "attention_mask": syn.attention_mask[i]}
            for i in range(len(syn))]
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    cfg = TrainConfig(max_steps=steps, batch_size=len(rows), lr=lr, optimizer="sgd", lr_schedule="constant",
                      max_grad_norm=0.0, snapshot_every=1, log_with="none", shuffle=False, cpu=True)
    train(model, rows, cfg, out, collate_fn=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]})
    return [t for _, t in load_snapshots(out)]


def test_real_data_with_the_experts_rate_reproduces_the_expert(tmp_path):
    lr = 0.5
    model = _lora_opt(dtype=torch.float32, attn="eager")
    syn = _synthetic(model)
    snaps = _expert(model, syn, steps=4, lr=lr, out=tmp_path / "expert")
    assert len(snaps) == 5
    E = model.get_input_embeddings().weight
    model.requires_grad_(False)
    full = [student_inputs(syn, syn.embeds, E)] * 3
    theta = unroll(model, snaps[0], torch.tensor(lr), full)
    assert float(matching_loss(theta, snaps[0], snaps[3])) < 1e-6       # N = M: the expert's own steps
    partial = unroll(model, snaps[0], torch.tensor(lr), full[:1])
    assert 0.05 < float(matching_loss(partial, snaps[0], snaps[3])) < 0.9  # N < M: part of the way
    # the whole loop: synthetic = real, rate = the expert's, batch = all, N = M -> matching ~ 0 each time
    traj = Trajectories([snaps], [list(range(5))], lr)
    cfg = DistillConfig(syn_steps=2, expert_span=2, iterations=3, batch_syn=len(syn), lr_embeds=0.0, lr_lr=0.0,
                        reg="none", save_every=10)
    state = distill(model, syn, traj, cfg, tmp_path / "d")
    assert max(r["matching"] for r in state.history) < 1e-6
    # from a quarter of the rate the match is poor; the outer loop lowers it (one start, so that the
    # iterations are comparable), moving the rate up towards the expert's
    cfg = DistillConfig(syn_steps=2, expert_span=2, max_start=1, iterations=20, batch_syn=len(syn),
                        init_lr=lr / 4, lr_embeds=2.5e-3, lr_lr=0.05, reg="none", save_every=100)
    state = distill(model, syn, traj, cfg, tmp_path / "d2")
    curve = [r["matching"] for r in state.history]
    assert curve[0] > 0.2 and max(curve[-3:]) < 0.5 * curve[0], curve
    assert lr / 4 < state.lr <= lr * 1.05


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_regulariser_and_projection_on_token_rows(metric):
    model = _lora_opt(dtype=torch.float32, attn="eager")
    E = model.get_input_embeddings().weight.detach()
    ids = torch.tensor([5, 0, 63, 17, 17, 42])
    x = E[ids].clone().requires_grad_(True)
    reg = neighbour_loss(x, E, metric)
    assert float(reg) == 0.0
    found, dist = nearest_tokens(E[ids], E, metric, chunk=4)
    assert found.tolist() == ids.tolist() and float(dist.abs().max()) == 0.0
    # every row of the matrix projects onto itself (no duplicate rows; OPT's padding row is 0, no direction)
    rows = torch.tensor([v for v in range(VOCAB) if metric == "l2" or float(E[v].norm()) > 0])
    assert len(rows) >= VOCAB - 1 and torch.equal(nearest_tokens(E[rows], E, metric)[0], rows)
    # off the rows: positive, and a small step along -grad lowers it
    y = (E[ids] + 0.05 * torch.randn(E[ids].shape, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    r = neighbour_loss(y, E, metric)
    assert float(r) > 0
    g, = torch.autograd.grad(r, y)
    assert float(neighbour_loss(y.detach() - 0.1 * g, E, metric)) < float(r)
    # brute force oracle of the nearest row
    brute = [min(range(VOCAB), key=lambda v: float((y[i] - E[v]).norm()) if metric == "l2" else
                 -float(torch.nn.functional.cosine_similarity(y[i], E[v], dim=0))) for i in range(len(ids))]
    assert nearest_tokens(y.detach(), E, metric)[0].tolist() == brute


ASCII = ["Question: Which gas do plants take in?\nAnswer:", "A. oxygen\nB. carbon dioxide\nC. helium  D. 42 %",
         "  leading spaces, tabs\tand ~!@#$^&*()_+{}|:\"<>?`-=[]\\;',./ symbols"]


def test_retokenisation_round_trips_ascii_text():
    from common.models import load_causal_lm, train_bpe_tokenizer

    bpe = train_bpe_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20 + ASCII, vocab_size=300)
    _, smol = load_causal_lm("smollm2-135m-instruct") if _has_smollm2() else (None, None)
    for tok in [t for t in (bpe, smol) if t is not None]:
        for text in ASCII:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids, skip_special_tokens=True) == text


def _has_smollm2() -> bool:
    try:
        from common.models import offline_model_path

        return offline_model_path("smollm2-135m-instruct").exists()
    except Exception:
        return False


def test_projection_of_undistilled_set_returns_the_real_prompts():
    from common.models import train_bpe_tokenizer
    from common.sft import SFTConfig
    from exp_distill_data.distill import build_synthetic

    tok = train_bpe_tokenizer(["Question: what is it?\nAnswer: a cat"] * 10 + ASCII, vocab_size=VOCAB * 4)
    torch.manual_seed(0)
    model = build_causal_lm("opt", vocab_size=len(tok), d_model=32, n_layers=1, n_heads=4)
    E = model.get_input_embeddings().weight.detach()
    examples = [{"prompt": t, "answer": " yes"} for t in ASCII]
    syn = build_synthetic(tok, E, examples, SFTConfig(max_len=128, template="plain", plain_template="{instruction}"))
    t = {**syn.tensors(), "init_embeds": syn.embeds}
    res = project_synthetic(t, E, tok, examples)
    assert [e["prompt"] for e in res["examples"]] == ASCII
    assert res["stats"]["changed_fraction"] == 0 and res["stats"]["nn_distance_after_mean"] == 0
    assert res["stats"]["prompt_unchanged_fraction"] == 1 and res["stats"]["retokenise_exact_fraction"] == 1
    # a moved vector projects to another token: the text changes where the vector moved
    row, pos = syn.learn_mask.nonzero()[3].tolist()
    other = (int(syn.input_ids[row, pos]) + 7) % len(tok)
    moved = syn.embeds.clone()
    moved[row, pos] = E[other] + 1e-4
    res = project_synthetic({**t, "embeds": moved}, E, tok, examples)
    assert res["stats"]["changed_fraction"] == pytest.approx(1 / int(syn.learn_mask.sum()))


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {repo!r})
    from tests.exp_distill_data.test_distill import _lora_opt, _synthetic, _params
    from exp_distill_data.distill import DistillConfig, Trajectories, distill
    torch.set_num_threads(1)
    model = _lora_opt(dtype=torch.float32, attn="eager")
    syn = _synthetic(model)
    start = _params(model)
    g = torch.Generator().manual_seed(3)
    snaps = [{{k: v + 0.01 * i * torch.randn(v.shape, generator=g) for k, v in start.items()}} for i in range(5)]
    traj = Trajectories([snaps], [list(range(5))], 0.3)
    cfg = DistillConfig(syn_steps=2, expert_span=2, iterations=9, batch_syn=3, save_every=2, reg={reg!r})
    kill_at = int(sys.argv[2])
    def progress(it, rec):
        if it == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    state = distill(model, syn, traj, cfg, sys.argv[1], progress=progress)
    torch.save({{"embeds": state.embeds.detach(), "lr": state.lr, "history": [r["matching"] for r in state.history]}},
               os.path.join(sys.argv[1], "final.pt"))
""")


@pytest.mark.parametrize("reg", ["nearest", "admm"])
def test_sigkilled_distillation_resumes_to_the_uninterrupted_result(tmp_path, reg):
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(repo=str(REPO), reg=reg))
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def go(folder, kill_at):
        return subprocess.run([sys.executable, str(script), str(folder), str(kill_at)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    ref = go(tmp_path / "ref", -1)
    assert ref.returncode == 0, ref.stderr[-2000:]
    first = go(tmp_path / "k", 5)                 # killed after iteration 5; the last state is from 4
    assert first.returncode == -signal.SIGKILL
    assert torch.load(tmp_path / "k" / "state.pt", weights_only=False)["iteration"] == 4
    again = go(tmp_path / "k", -1)
    assert again.returncode == 0, again.stderr[-2000:]
    a = torch.load(tmp_path / "ref" / "final.pt", weights_only=False)
    b = torch.load(tmp_path / "k" / "final.pt", weights_only=False)
    assert torch.equal(a["embeds"], b["embeds"]) and a["lr"] == b["lr"] and a["history"] == b["history"]
    assert len(a["history"]) == 9


def test_config_errors_name_the_key():
    from exp_distill_data.config import Config, parse_ablation

    assert parse_ablation("syn_steps=4,metric=cosine") == {"syn_steps": 4, "metric": "cosine"}
    for spec, key in [("steps=4", "distill.ablations"), ("metric=manhattan", "distill.metric"),
                      ("syn_steps", "distill.ablations")]:
        with pytest.raises(ValueError, match=key):
            parse_ablation(spec)
    cfg = Config()
    cfg.distill.variants = ["ours", "mine"]
    with pytest.raises(ValueError, match="distill.variants"):
        cfg.validate()
    cfg = Config()
    cfg.distill.distillers = ["gpt2"]
    with pytest.raises(ValueError, match="distill.distillers"):
        cfg.validate()


def test_jobs_and_students_cover_every_variant_seed_and_setting():
    from exp_distill_data.config import Config
    from exp_distill_data.run import distill_jobs, random_subset, student_runs

    cfg = Config(settings=["opt_local->smol", "smol->smol"], seeds=[0, 1, 2], budgets=[0.05, 0.1])
    cfg.distill.ablations = ["init=random"]
    jobs = distill_jobs(cfg, 400)
    assert len(jobs) == 2 * 2 * 3 + 1 and len({j["name"] for j in jobs}) == len(jobs)
    assert {j["distiller"] for j in jobs} == {"opt_local"}
    assert all(j["overrides"] == {"reg": "none"} for j in jobs if j["method"] == "ours_noreg")
    runs = student_runs(cfg, 400)
    main = [r for r in runs if not r["ablation"]]
    # each main set: text on the setting's trainer and on the distiller itself, and the embedding student
    assert len(main) == 12 * 3 and len([r for r in runs if r["ablation"]]) == 1
    assert {(r["kind"], r["trainer"]) for r in main} == {("text", "smol"), ("text", "opt_local"), ("emb", "opt_local")}
    # a seed's synthetic set starts from the random baseline's subset of that seed (subset_for uses it too)
    import random
    assert random_subset(400, 20, 1) == sorted(random.Random(1001).sample(range(400), 20))


def test_a_llama_distiller_runs_the_same_loop(tmp_path):
    """Llama -> Llama: the same outer loop on a tiny Llama with LoRA on q/k/v/o (eager attention)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    m = build_causal_lm("llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, attn_implementation="eager")
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])).eval()
    syn = _synthetic(m)
    start = _params(m)
    g = torch.Generator().manual_seed(0)
    snaps = [{k: v + 0.01 * i * torch.randn(v.shape, generator=g) for k, v in start.items()} for i in range(4)]
    state = distill(m, syn, Trajectories([snaps], [list(range(4))], 0.3),
                    DistillConfig(syn_steps=2, expert_span=2, iterations=3, batch_syn=3), tmp_path)
    assert len(state.history) == 3 and all(r["matching"] > 0 for r in state.history)
    moved = (state.embeds.detach() - syn.embeds)
    assert float(moved[syn.learn_mask].abs().max()) > 0 and float(moved[~syn.learn_mask].abs().max()) == 0
