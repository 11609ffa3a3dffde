"""exp_distill_data.less: per-example gradients (torch.func vs a backward loop with the model's own loss),
Adam features (vs hand arithmetic and vs a real torch AdamW step), the blocked random projector, LESS
scores (vs LESS's matching.py formula, vs the unprojected computation) and top-k."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from common.models import build_causal_lm
from exp_distill_data import less
from exp_distill_data.less import (
    AdamState,
    RandomProjector,
    adam_features,
    adam_state_from_optimizer,
    adam_state_from_state_dict,
    compute_features,
    less_scores,
    less_subtask_scores,
    per_example_grads,
    select_top_k,
)

VOCAB = 64
torch.set_num_threads(1)


def _tiny(lora: bool = True, seed: int = 0, attn: str = "eager") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_causal_lm("llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, attn_implementation=attn)
    if lora:
        from peft import LoraConfig, get_peft_model
        # random (non-zero) B so that every LoRA matrix has a gradient, as after warm-up
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, init_lora_weights=False,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model.double()


def _batch(n: int, seed: int, max_len: int = 12) -> dict[str, torch.Tensor]:
    """Right-padded examples: prompt (label -100), answer (labelled), padding (mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, max_len, dtype=torch.long)
    mask = torch.zeros(n, max_len, dtype=torch.long)
    labels = torch.full((n, max_len), -100)
    for i in range(n):
        length = int(torch.randint(6, max_len + 1, (1,), generator=g))
        prompt = int(torch.randint(2, length - 1, (1,), generator=g))
        ids[i, :length] = torch.randint(1, VOCAB, (length,), generator=g)
        mask[i, :length] = 1
        labels[i, prompt:length] = ids[i, prompt:length]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _warm(model: torch.nn.Module, steps: int = 3, lr: float = 1e-2, seed: int = 7) -> torch.optim.Optimizer:
    """A few AdamW steps, so that the optimizer holds real moments (a warm-up checkpoint)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for s in range(steps):
        opt.zero_grad()
        model(**_batch(4, seed + s)).loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


@pytest.fixture(scope="module")
def lora_model():
    model = _tiny()
    opt = _warm(model)
    return model, opt


@pytest.mark.parametrize("lora", [True, False])
def test_func_per_example_grads_equal_the_backward_loop(lora):
    model = _tiny(lora)
    batch = _batch(6, seed=1)
    g_func = per_example_grads(model, batch, method="func", chunk=4)
    g_loop = per_example_grads(model, batch, method="loop")
    assert g_func.shape == (6, less.num_trainable(model))
    if lora:   # only the LoRA matrices: the base weights are frozen by peft
        assert less.num_trainable(model) == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    cos = F.cosine_similarity(g_func, g_loop, dim=1)
    assert (cos >= 0.9999).all(), cos
    # the loop uses HF's loss (float32 logits), hence the float32-level tolerance
    assert torch.allclose(g_func, g_loop, rtol=1e-4, atol=1e-6 * g_loop.abs().max().item())


def test_func_grads_work_on_an_sdpa_model_and_restore_it():
    model = _tiny(lora=False, attn="sdpa")
    model.train()
    batch = _batch(3, seed=4)
    g_func = per_example_grads(model, batch, method="func")
    assert model.config._attn_implementation == "sdpa" and model.training   # both restored
    g_loop = per_example_grads(model, batch, method="loop")
    assert (F.cosine_similarity(g_func, g_loop, dim=1) >= 0.9999).all()


def test_masking_padding_and_batch_independence(lora_model):
    model, _ = lora_model
    batch = _batch(4, seed=2)
    base = per_example_grads(model, batch, chunk=4)
    # another example of the batch changes: example 0's gradient does not
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][1] = torch.randint(1, VOCAB, (other["input_ids"].shape[1],))
    other["labels"][1] = torch.where(other["labels"][1] == -100, -100, other["input_ids"][1])
    again = per_example_grads(model, other, chunk=4)
    assert torch.allclose(again[0], base[0], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(again[1], base[1])
    # tokens under padding (mask 0, label -100) change nothing, bit for bit at the same length
    masked = {k: v.clone() for k, v in batch.items()}
    masked["input_ids"][masked["attention_mask"] == 0] = 17
    assert torch.equal(per_example_grads(model, masked, chunk=4), base)
    # more padding: equal up to float32 rounding (HF's RoPE computes cos/sin in float32, and the
    # vectorised cos of a longer position range differs in the last bit)
    padded = {k: F.pad(v, (0, 5), value=-100 if k == "labels" else 0) for k, v in batch.items()}
    assert torch.allclose(per_example_grads(model, padded, chunk=4), base, rtol=0, atol=1e-6 * base.abs().max())
    # a prompt token (label -100 but attended) does change the gradient; no answer token: zero gradient
    prompt_changed = {k: v.clone() for k, v in batch.items()}
    prompt_changed["input_ids"][0, 0] = (prompt_changed["input_ids"][0, 0] % (VOCAB - 1)) + 1
    assert not torch.allclose(per_example_grads(model, prompt_changed)[0], base[0])
    no_answer = {k: v.clone() for k, v in batch.items()}
    no_answer["labels"][2] = -100
    for method in ("func", "loop"):
        g = per_example_grads(model, no_answer, method=method)
        assert torch.count_nonzero(g[2]) == 0 and torch.allclose(g[0], base[0], rtol=1e-4)


def test_adam_feature_equals_hand_computation_and_a_real_adam_step(lora_model):
    model, opt = lora_model
    one = _batch(1, seed=3)
    model.eval()   # no LoRA dropout: features are taken in eval mode (as LESS's from_pretrained models are)
    model.zero_grad()
    model(**one).loss.backward()   # independent gradient: plain autograd through HF's loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.cat([p.grad.flatten() for p in params])
    model.zero_grad(set_to_none=True)
    m = torch.cat([opt.state[p]["exp_avg"].flatten() for p in params])
    v = torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in params])
    b1, b2, eps = 0.9, 0.999, 1e-8
    hand_less = (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g * g + eps)   # LESS's code

    state = adam_state_from_optimizer(opt, model)
    assert state.step == 3 and state.betas == (0.9, 0.999) and state.eps == 1e-8
    feat = compute_features(model, [one], kind="adam", optimizer_state=state, normalize=False)[0]
    assert torch.allclose(feat, hand_less, rtol=1e-4, atol=1e-6)
    normed = compute_features(model, [one], kind="adam", optimizer_state=state)[0]
    assert torch.allclose(normed, hand_less / hand_less.norm(), rtol=1e-4, atol=1e-7)

    # formula="torch": the direction torch's AdamW actually steps in, given this gradient
    sd_state = adam_state_from_state_dict(opt.state_dict(), model, formula="torch")
    assert torch.equal(sd_state.exp_avg, state.exp_avg) and sd_state.step == 3
    torch_feat = compute_features(model, [one], kind="adam", optimizer_state=sd_state, normalize=False)[0]
    model2, opt2 = copy.deepcopy((model, opt))   # one deepcopy: opt2 steps model2's parameters
    p2 = [p for p in model2.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in p2])
    off = 0
    for p in p2:
        p.grad = g[off: off + p.numel()].view_as(p).clone()
        off += p.numel()
    opt2.step()
    step_dir = (before - torch.cat([p.detach().flatten() for p in p2])) / opt2.param_groups[0]["lr"]
    assert torch.allclose(torch_feat, step_dir, rtol=1e-4, atol=1e-6)
    # with eps = 0 the two formulas are proportional (bias correction is then a global factor)
    no_eps = [adam_features(g[None], AdamState(state.exp_avg, state.exp_avg_sq, 3, eps=0.0, formula=f))[0]
              for f in ("less", "torch")]
    assert F.cosine_similarity(*no_eps, dim=0) > 1 - 1e-12


def test_adam_state_from_state_dict_by_name_and_errors(lora_model):
    model, opt = lora_model
    names = list(less.trainable_parameters(model))
    sd = opt.state_dict()
    by_name = {"state": {n: sd["state"][i] for i, n in enumerate(names)}, "param_groups": sd["param_groups"]}
    assert torch.equal(adam_state_from_state_dict(by_name, model).exp_avg_sq,
                       adam_state_from_optimizer(opt, model).exp_avg_sq)
    with pytest.raises(ValueError, match="optimizer_state"):
        compute_features(model, [_batch(1, 0)], kind="adam")
    with pytest.raises(ValueError, match="entries"):
        adam_features(torch.zeros(1, 5), AdamState(torch.zeros(4), torch.zeros(4), 1))


def test_projector_blocks_equal_the_full_matrix_and_are_deterministic():
    P, d = 700, 96
    proj = RandomProjector(d, seed=5, block_rows=256, dtype=torch.float64)
    full = proj.matrix(P)   # built once
    assert full.shape == (P, d)
    assert set((full * math.sqrt(d)).unique().tolist()) == {-1.0, 1.0}
    assert abs(full.mean().item()) * math.sqrt(d) < 0.02
    x = torch.randn(5, P, dtype=torch.float64)
    want = x @ full
    for block_rows in (1, 100, 256, 1000):   # streaming block size (and tile boundaries) change nothing
        got = RandomProjector(d, seed=5, block_rows=block_rows, dtype=torch.float64, cache_bytes=0).project(x)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    torch.manual_seed(123)   # global RNG state is irrelevant; a fresh instance gives the same rows
    assert torch.equal(RandomProjector(d, seed=5).rows(300, 555, dtype=torch.float64), full[300:555] * math.sqrt(d))
    assert torch.equal(proj.project(x), proj.project(x))
    assert not torch.equal(RandomProjector(d, seed=6).matrix(P), full)
    # a prefix: the rows do not depend on P
    assert torch.equal(RandomProjector(d, seed=5).matrix(300), full[:300])
    gauss = RandomProjector(d, seed=5, kind="gaussian").matrix(P) * math.sqrt(d)
    assert abs(gauss.mean().item()) < 0.02 and abs(gauss.var().item() - 1) < 0.03


def test_projector_is_the_same_in_another_process():
    code = ("from exp_distill_data.less import RandomProjector; import torch; "
            "r = RandomProjector(64, seed=11).rows(0, 600, dtype=torch.float64); "
            "w = torch.arange(r.numel(), dtype=torch.float64).reshape(r.shape); print(repr((r * w).sum().item()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": ".", "OMP_NUM_THREADS": "1", "PATH": ""})
    r = RandomProjector(64, seed=11).rows(0, 600, dtype=torch.float64)
    w = torch.arange(r.numel(), dtype=torch.float64).reshape(r.shape)
    assert float(out.stdout.strip()) == (r * w).sum().item()


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_approximately_preserves_inner_products(kind):
    P, d, pairs = 3000, 1024, 40
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(pairs, P, generator=g, dtype=torch.float64), dim=1)
    v = F.normalize(u + 0.8 * torch.randn(pairs, P, generator=g, dtype=torch.float64) / math.sqrt(P), dim=1)
    proj = RandomProjector(d, seed=1, kind=kind, dtype=torch.float64)
    pu, pv = proj.project(u), proj.project(v)
    true = (u * v).sum(1)
    err = (pu * pv).sum(1) - true
    assert err.abs().max() < 5 / math.sqrt(d)
    # JL: Var[<Ru, Rv>] = (1 + <u,v>^2) / d for Rademacher and Gaussian entries (up to O(1/P) terms)
    rms, expect = err.pow(2).mean().sqrt(), ((1 + true ** 2) / d).mean().sqrt()
    assert 0.6 * expect < rms < 1.5 * expect
    assert ((pu.norm(dim=1) - 1).abs() < 5 / math.sqrt(d)).all()


def test_less_scores_hand_example_and_lesss_matching_formula():
    # 2-d features; subtask "a" = two vectors, "b" = one; two checkpoints with lrs 3 and 1
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]])
    val = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([[0.0, -3.0]])}
    scores, names = less_subtask_scores([t, t], [val, val], [3.0, 1.0])
    s2 = math.sqrt(0.5)
    want = torch.tensor([[0.5, 0.0], [0.5, -1.0], [s2, -s2], [-0.5, 0.0]], dtype=torch.float64)
    assert names == ["a", "b"] and torch.allclose(scores, want)
    assert torch.allclose(less_scores([t, t], [val, val], [3.0, 1.0]), torch.tensor([0.5, 0.5, s2, 0.0],
                                                                                     dtype=torch.float64))
    # LESS's matching.py on normalised features with equal-size subtasks: reshape(n, S, -1).mean(-1).max(-1)
    g = torch.Generator().manual_seed(0)
    n, S, m, d = 30, 3, 4, 16
    T = [F.normalize(torch.randn(n, d, generator=g), dim=1) for _ in range(2)]
    V = [F.normalize(torch.randn(S * m, d, generator=g), dim=1) for _ in range(2)]
    lrs = [1.6877e-05, 1.2859e-05]
    w = [x / sum(lrs) for x in lrs]
    ref = (w[0] * T[0] @ V[0].T + w[1] * T[1] @ V[1].T).reshape(n, S, m).mean(-1).max(-1)[0]
    vals = [{f"s{j}": Vc[j * m:(j + 1) * m] for j in range(S)} for Vc in V]
    assert torch.allclose(less_scores(T, vals, lrs).float(), ref, atol=1e-6)


def test_select_top_k_ties_by_index():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, -1.0, 0.5, 0.9])
    assert select_top_k(scores, 4).tolist() == [1, 3, 6, 2]
    assert select_top_k(scores, 0).tolist() == []
    assert select_top_k(scores, 7).tolist() == [1, 3, 6, 2, 5, 0, 4]
    with pytest.raises(ValueError):
        select_top_k(torch.tensor([0.0, float("nan")]), 1)
    # many ties: numpy's lexsort (score descending, then index) is the oracle
    many = torch.randint(0, 5, (5000,), generator=torch.Generator().manual_seed(0)).double()
    want = np.lexsort((np.arange(5000), -many.numpy()))[:1234]
    assert select_top_k(many, 1234).tolist() == want.tolist()


def test_projected_less_scores_rank_like_the_unprojected_computation(lora_model):
    """The whole pipeline on two checkpoints: Adam training features, SGD validation features of two
    subtasks, LR-weighted cosine, max over subtasks; projected at d = 8192 vs not projected."""
    model, opt = lora_model
    ckpts = []
    for c in range(2):   # a second checkpoint: two more warm-up steps
        if c:
            for s in range(2):
                opt.zero_grad()
                model(**_batch(4, 50 + s)).loss.backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
        ckpts.append((copy.deepcopy(model), adam_state_from_optimizer(opt, model)))
    train = [_batch(16, seed=100 + i) for i in range(3)]
    val = {"sub_a": [_batch(3, seed=200)], "sub_b": [_batch(3, seed=300)]}
    proj = RandomProjector(8192, seed=0)
    out = {}
    for name, p in (("projected", proj), ("exact", None)):
        tr = [compute_features(m, train, kind="adam", optimizer_state=st, projector=p, chunk=8) for m, st in ckpts]
        va = [{s: compute_features(m, b, kind="sgd", projector=p) for s, b in val.items()} for m, _ in ckpts]
        out[name] = less_scores(tr, va, lrs=[2e-5, 1e-5])
    assert out["exact"].shape == (48,)
    rho = spearmanr(out["projected"].numpy(), out["exact"].numpy()).statistic
    assert rho >= 0.9, rho
    assert set(select_top_k(out["projected"], 5).tolist()) & set(select_top_k(out["exact"], 5).tolist())


def test_feature_shards_resume(tmp_path, lora_model):
    model, _ = lora_model
    batches = [_batch(3, seed=400 + i) for i in range(3)]
    proj = RandomProjector(32, seed=0)
    want = compute_features(model, batches, kind="sgd", projector=proj)
    assert less.write_feature_shards(model, batches, tmp_path, kind="sgd", projector=proj) == 3
    assert torch.allclose(less.read_feature_shards(tmp_path), want)
    # a killed run: shard 1 missing; only it is recomputed (the others are not even read)
    (tmp_path / "feats-000001.pt").unlink()
    torch.save(torch.zeros(3, 32), tmp_path / "feats-000000.pt")   # would survive a recompute-all
    less.write_feature_shards(model, batches, tmp_path, kind="sgd", projector=proj)
    got = less.read_feature_shards(tmp_path)
    assert torch.count_nonzero(got[:3]) == 0 and torch.allclose(got[3:], want[3:])
    with pytest.raises(ValueError, match="not comparable"):
        less.write_feature_shards(model, batches, tmp_path, kind="sgd", projector=RandomProjector(32, seed=1))


def test_feature_shards_split_over_processes(tmp_path, lora_model):
    model, _ = lora_model
    batches = [_batch(2, seed=500 + i) for i in range(5)]
    proj = RandomProjector(16, seed=3)
    want = compute_features(model, batches, kind="sgd", projector=proj)
    assert less.write_feature_shards(model, batches, tmp_path, rank=1, world_size=2, kind="sgd", projector=proj) == 5
    assert sorted(p.name for p in tmp_path.glob("feats-*.pt")) == ["feats-000001.pt", "feats-000003.pt"]
    with pytest.raises(FileNotFoundError, match="feats-000000"):   # a gap is an error, not a shorter tensor
        less.read_feature_shards(tmp_path)
    less.write_feature_shards(model, batches, tmp_path, rank=0, world_size=2, kind="sgd", projector=proj)
    assert torch.allclose(less.read_feature_shards(tmp_path), want)
