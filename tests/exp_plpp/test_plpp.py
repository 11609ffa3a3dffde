"""Prompt learners and PLPP's losses on a tiny random CLIP (exp_plpp.clip_hf) and on exact constructions.

Oracles: the CLIP tokenizer (prompt layouts), brute-force argmax / softmax (labels), a hand-written identity
encoder (the perplexity loss's minimum), finite, decreasing training losses, scipy's t-interval (table)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from exp_plpp.clip_hf import tiny_clip
from exp_plpp.learn import LearnConfig, evaluate, parse_method, train_prompts, transfer
from exp_plpp.plpp import PLPPConfig, context_states, cosine_scores, lm_head_logits, plpp_loss, topk_soft_labels
from exp_plpp.prompts import PromptConfig, PromptLearner, encode_prompts
from exp_plpp.table import summary_rows

torch.set_num_threads(1)

WORDS = ["a", "photo", "of", "red", "blue", "seven", "two", "great", "white", "shark"]
CLASSES = ["red seven", "blue two", "great white shark", "seven"]   # 2, 2, 3, 1 tokens


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(WORDS, seed=0).freeze()


def _placeholder_learner(clip, pos: str, n_ctx: int = 4) -> PromptLearner:
    learner = PromptLearner(clip, CLASSES, PromptConfig(n_ctx=n_ctx, ctx_init="", class_token_position=pos))
    with torch.no_grad():   # context = the embedding of "X": then each layout is a real tokenised sentence
        x = clip.tokenize(["x"]).input_ids[0, 1]
        learner.ctx.copy_(clip.token_embedding.weight[x].expand(n_ctx, -1))
    return learner


@pytest.mark.parametrize("pos,template", [("end", "x x x x {}."), ("front", "{} x x x x."),
                                          ("middle", "x x {} x x.")])
def test_prompt_layouts_equal_tokenised_sentences(clip, pos, template):
    learner = _placeholder_learner(clip, pos)
    got = learner.assemble(learner.context())
    tok = clip.tokenize([template.format(c) for c in CLASSES])
    want = clip.token_embedding(tok.input_ids)
    assert got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.equal(learner.attention_mask, tok.attention_mask) and torch.equal(learner.pool_index, tok.pool_index)
    # context_positions point at the context vectors in every layout
    pos_idx = learner.context_positions()
    x = clip.tokenize(["x"]).input_ids[0, 1]
    assert (tok.input_ids.gather(1, pos_idx) == x).all()


def test_ctx_init_from_words(clip):
    learner = PromptLearner(clip, CLASSES, PromptConfig(ctx_init="a photo of a"))
    tok = clip.tokenize([f"a photo of a {c}." for c in CLASSES])
    assert learner.n_ctx == 4
    assert torch.equal(learner.assemble(learner.context()), clip.token_embedding(tok.input_ids))


def test_context_states_identical_across_classes_under_causal_mask(clip):
    learner = PromptLearner(clip, CLASSES, PromptConfig(n_ctx=4, ctx_init=""))
    hidden, _ = encode_prompts(clip, learner, learner.context())
    ctx_states = hidden[:, : 1 + learner.n_ctx]
    assert torch.allclose(ctx_states, ctx_states[:1].expand_as(ctx_states), atol=1e-6)
    assert not torch.allclose(hidden[:, 1 + learner.n_ctx], hidden[:1, 1 + learner.n_ctx].expand(len(CLASSES), -1),
                              atol=1e-4)


def test_one_row_shortcut_equals_all_rows(clip):
    """learn._plpp_term reads one prompt row when the encoder is causal: the loss equals the all-row mean."""
    learner = PromptLearner(clip, CLASSES, PromptConfig(n_ctx=4, ctx_init=""))
    hidden, _ = encode_prompts(clip, learner, learner.context())
    E = clip.token_embedding.weight
    cfg = PLPPConfig()
    pos = learner.context_positions()
    one, _ = plpp_loss(learner.ctx, context_states(hidden[:1], pos[:1], "same"), E, cfg)
    every, _ = plpp_loss(learner.ctx, context_states(hidden, pos, "same"), E, cfg)
    assert torch.allclose(one, every, atol=1e-5)


def test_lm_head_is_embedding_transpose_and_gets_no_gradient(clip):
    learner = PromptLearner(clip, CLASSES, PromptConfig(n_ctx=4, ctx_init=""))
    hidden, _ = encode_prompts(clip, learner, learner.context())
    E = clip.token_embedding.weight
    assert torch.equal(lm_head_logits(hidden, E), hidden @ E.T)
    loss, _ = plpp_loss(learner.ctx, context_states(hidden[:1], learner.context_positions()[:1], "same"), E,
                        PLPPConfig(detach_teacher=False))
    loss.backward()
    assert E.grad is None and not E.requires_grad
    assert learner.ctx.grad is not None and torch.isfinite(learner.ctx.grad).all() and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())


def test_context_states_next_reads_previous_position():
    hidden = torch.arange(2 * 6 * 3, dtype=torch.float).view(2, 6, 3)
    positions = torch.tensor([[1, 2], [3, 4]])
    same = context_states(hidden, positions, "same")
    nxt = context_states(hidden, positions, "next")
    assert torch.equal(same[1, 0], hidden[1, 3]) and torch.equal(nxt[1, 0], hidden[1, 2])


def test_topk_soft_labels_against_brute_force():
    g = torch.Generator().manual_seed(0)
    ctx, E = torch.randn(3, 8, generator=g), torch.randn(40, 8, generator=g)
    s = cosine_scores(ctx, E)
    ref = np.array([[np.dot(c, e) / np.linalg.norm(c) / np.linalg.norm(e) for e in E.numpy()] for c in ctx.numpy()])
    assert np.allclose(s.numpy(), ref, atol=1e-6)
    idx, q = topk_soft_labels(s, 5, 0.1)
    assert torch.allclose(q.sum(-1), torch.ones(3))
    top = np.argsort(-ref, axis=1)[:, :5]
    assert (idx.numpy() == top).all()
    want = np.exp(np.take_along_axis(ref, top, 1) / 0.1)
    assert np.allclose(q.numpy(), want / want.sum(1, keepdims=True), atol=1e-5)
    idx1, q1 = topk_soft_labels(s, 1, 0.1)
    assert (idx1[:, 0].numpy() == ref.argmax(1)).all() and torch.equal(q1, torch.ones(3, 1))


def test_hard_perplexity_loss_is_minimal_on_token_embeddings():
    """Identity 'encoder' (the LM head reads the context vector itself) and unit-norm, near-orthogonal E:
    on the unit sphere the hard PLPP loss is lowest exactly at a token embedding."""
    g = torch.Generator().manual_seed(0)
    E = F.normalize(torch.randn(30, 64, generator=g), dim=-1)
    cfg = PLPPConfig(label_mode="hard", lm_tau=0.1, use_inverted=False, lambda_ppl=1.0)

    def loss(t: torch.Tensor) -> float:
        t = F.normalize(t, dim=-1).view(1, 1, -1)
        return float(plpp_loss(t[0], t, E, cfg)[0])

    for v in range(5):
        at_token = loss(E[v])
        for _ in range(20):
            assert at_token < loss(E[v] + 0.2 * torch.randn(64, generator=g))
    # and the perplexity of k = 1 does not collapse to 0 (a student renormalised over one entry would)
    assert loss(E[0] + 0.5 * torch.randn(64, generator=g)) > 0.1


def _separable_features(n_cls: int, per: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_cls, dim, generator=g), dim=-1)
    y = torch.arange(n_cls).repeat_interleave(per)
    return F.normalize(centres[y] + 0.3 * torch.randn(len(y), dim, generator=g), dim=-1), y


@pytest.mark.parametrize("method", ["coop", "coop_plpp", "kgcoop_plpp", "cocoop_plpp"])
def test_losses_finite_and_decreasing(clip, method):
    f, y = _separable_features(len(CLASSES), 6, clip.model.config.projection_dim, 0)
    cfg = LearnConfig(epochs=12, cocoop_epochs=6, batch_size=8, cocoop_batch_size=8, lr=0.01, warmup_epochs=0)
    learner, hist = train_prompts(clip, f, y, CLASSES, "a photo of a {}.", method, PromptConfig(ctx_init=""),
                                  PLPPConfig(lambda_ppl=0.1, lambda_inv=0.1), cfg, seed=0)
    assert all(np.isfinite(h[k]) for h in hist for k in ("ce", "l_ppl", "l_inv", "kg"))
    assert hist[-1]["loss"] < hist[0]["loss"]   # the objective (KgCoOp's w * kg term can outweigh the CE)
    if parse_method(method)[1]:
        assert hist[-1]["l_ppl"] > 0
    acc = evaluate(clip, learner, f, y, CLASSES, "a photo of a {}.", method)
    assert 0 <= acc <= 1


def test_same_seed_same_prompts(clip):
    f, y = _separable_features(len(CLASSES), 4, clip.model.config.projection_dim, 1)
    cfg = LearnConfig(epochs=3, batch_size=4)
    a, _ = train_prompts(clip, f, y, CLASSES, "{}", "coop_plpp", PromptConfig(ctx_init=""), PLPPConfig(), cfg, 7)
    b, _ = train_prompts(clip, f, y, CLASSES, "{}", "coop_plpp", PromptConfig(ctx_init=""), PLPPConfig(), cfg, 7)
    assert torch.equal(a.ctx, b.ctx)


def test_transfer_keeps_context_and_zero_shot_is_hand_prompt(clip):
    f, y = _separable_features(2, 3, clip.model.config.projection_dim, 2)
    learner, _ = train_prompts(clip, f, y, CLASSES[:2], "{}", "cocoop", PromptConfig(ctx_init=""), PLPPConfig(),
                               LearnConfig(cocoop_epochs=1, batch_size=2), 0)
    moved = transfer(clip, learner, CLASSES[2:])
    assert torch.equal(moved.ctx, learner.ctx) and moved.classnames == CLASSES[2:]
    assert torch.equal(moved.meta_net[0].weight, learner.meta_net[0].weight)
    txt = F.normalize(clip.encode_text([f"a photo of a {c}." for c in CLASSES[:2]]), dim=-1)
    want = float(((f @ txt.T).argmax(1) == y).float().mean())
    assert evaluate(clip, None, f, y, CLASSES[:2], "a photo of a {}.", "zeroshot") == want
    with pytest.raises(ValueError):
        transfer(clip, PromptLearner(clip, CLASSES[:2], PromptConfig(csc=True)), CLASSES[2:])


def test_ablation_specs_are_checked():
    from exp_plpp.config import parse_ablation

    assert parse_ablation("lambda_ppl=1,label_mode=hard") == {"lambda_ppl": 1, "label_mode": "hard"}
    with pytest.raises(ValueError, match="key=value pairs of PLPPConfig"):
        parse_ablation("lambda=1")
    with pytest.raises(ValueError, match="position"):
        parse_ablation("position=left")


def test_config_errors():
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("zeroshot_plpp")
    with pytest.raises(ValueError, match="label_mode"):
        PLPPConfig(label_mode="medium").validate()
    with pytest.raises(ValueError, match="class_token_position"):
        PromptConfig(class_token_position="left").validate()


def test_summary_rows_pairs_by_seed_against_scipy():
    rows = []
    for seed, (a, b) in zip([1, 2, 3], [(0.60, 0.55), (0.62, 0.60), (0.58, 0.57)]):
        for method, v in (("coop_plpp", a), ("coop", b)):
            rows.append({"table": "plpp_b2n", "method": method, "metric": "hm", "value": v, "seed": seed,
                         "params": {"dataset": "digits", "shots": 16}})
    out = {(r["method"], r["metric"]): r["value"] for r in summary_rows(rows)}
    d = np.array([0.05, 0.02, 0.01])
    lo, hi = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
    assert out[("coop_plpp-coop", "hm_diff_mean")] == pytest.approx(d.mean())
    assert out[("coop_plpp-coop", "hm_diff_ci95_low")] == pytest.approx(lo)
    assert out[("coop_plpp-coop", "hm_diff_ci95_high")] == pytest.approx(hi)
    assert out[("coop", "hm_mean")] == pytest.approx(np.mean([0.55, 0.60, 0.57]))


@pytest.mark.parametrize("shared", [True, False])
def test_sparse_topk_path_equals_the_dense_graph(shared):
    """The default (teachers' top-k found without autograd, students at k tokens) gives the dense path's
    loss and gradients."""
    g = torch.Generator().manual_seed(3)
    E = torch.randn(60, 12, generator=g)
    states = torch.randn(5, 4, 12, generator=g, requires_grad=True)
    ctx = torch.randn(4, 12, generator=g) if shared else torch.randn(5, 4, 12, generator=g)
    ctx.requires_grad_(True)
    out = {}
    for sparse in (True, False):
        cfg = PLPPConfig(k=6, tau=0.1, sparse_topk=sparse)
        loss, st = plpp_loss(ctx, states, E, cfg)
        gc, gs = torch.autograd.grad(loss, [ctx, states])
        out[sparse] = (loss.detach(), gc, gs, st)
    for a, b in zip(out[True][:3], out[False][:3]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert out[True][3] == pytest.approx(out[False][3], rel=1e-6)
