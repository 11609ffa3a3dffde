"""Bounds: measured <= bound per token on random instances; bound / measured stays below a stated factor
for one block (the composition over depth is a worst case and grows geometrically: see README)."""

import pytest
import torch

from common.lowp.tracer import Policy, Tracer, safe_div
from exp_roundoff.bounds import (
    forward_error_bound,
    forward_error_estimate,
    gemm_bound,
    norm_bound,
    softmax_propagated_bound,
    weight_functionals,
)
from exp_roundoff.models import build_model, scale_qk

# One block: the first-order bound exceeds the measured per-token error by at most this factor (median over
# tokens). Measured on random instances: 30-200x (the componentwise |X||W| accumulation term is a worst case
# over signs, and the norm/attention Lipschitz constants are worst cases over directions).
MAX_FACTOR_ONE_BLOCK = 1e3


def _trace(arch, fmt, n_layers, seed):
    model = build_model(arch, vocab_size=64, d_model=32, n_layers=n_layers, n_heads=4, seq_len=32, seed=seed,
                        n_kv_heads=2 if arch == "llama" else None)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randint(0, 64, (2, 12), generator=g), None), (torch.randint(0, 64, (1, 7), generator=g), None)]
    pol = Policy.uniform(fmt)
    res = Tracer(model, pol, capture=True, keep_token_values=True).run_batches(batches)
    return model, res, pol


@pytest.mark.parametrize(("fmt", "seed"), [("bf16", 0), ("fp16", 1)])
def test_block_bound_holds_per_token(arch, fmt, seed):
    _, res, pol = _trace(arch, fmt, 3, seed)
    bound = forward_error_bound(res, pol)
    for layer in range(3):
        measured = res.token_values[(layer, "block_out", "forward", "rel_l2")]
        assert measured.shape == bound["block_rel"][layer].shape
        assert torch.all(measured <= bound["block_rel"][layer]), f"layer {layer}"
    logits = res.token_values[(3, "logits", "forward", "rel_l2")]
    assert torch.all(logits <= bound["logits_rel"])
    first = bound["block_rel"][0] / res.token_values[(0, "block_out", "forward", "rel_l2")]
    assert first.median() < MAX_FACTOR_ONE_BLOCK


def test_local_op_bounds_hold_and_are_tight(arch):
    """With zero input error the GEMM and norm bounds bound each op's own rounding error (the tracer's local
    error: the op evaluated exactly on the emulated inputs); within 100x for the GEMM."""
    _, res, pol = _trace(arch, "bf16", 1, 3)
    caps = res.captures[0][0]
    down = next(c for c in caps if c["op"] == "mlp_down")
    y = down["y"].reshape(-1, down["y"].shape[-1])
    loc = gemm_bound(down, torch.zeros(y.shape[0], dtype=torch.float64), pol.mlp_down)
    loc = safe_div(loc, y.norm(dim=-1))
    measured = res.token_values[(0, "mlp_down", "local", "rel_l2")][: y.shape[0]]
    assert torch.all(measured <= loc) and (loc / measured).nanmedian() < 100
    norm = next(c for c in caps if c["op"] == "norm")
    yn = norm["y"].reshape(-1, norm["y"].shape[-1])
    nloc = norm_bound(norm, torch.zeros(yn.shape[0], dtype=torch.float64), pol.norm)
    nloc = safe_div(nloc, yn.norm(dim=-1))
    measured = res.token_values[(0, "norm", "local", "rel_l2")][: yn.shape[0]]
    assert torch.all(measured <= nloc)


def test_softmax_propagated_bound_holds_and_is_sink_aware():
    """||J Δ||_1 <= bound for every sign pattern of |Δ| = b (the worst cases of this convex function lie on the
    box's vertices); never looser than 2 Σ p b; with a sink (p_k = 0.999, largest error on the sink logit, as
    when its key is large) tighter by ~ p_k / (1 - p_k)."""
    g = torch.Generator().manual_seed(0)
    n = 6
    signs = torch.tensor([[(v >> i) & 1 for i in range(n)] for v in range(2**n)], dtype=torch.float64) * 2 - 1
    for sink in (None, 0.5, 0.9, 0.999):
        logits = torch.randn(50, n, generator=g, dtype=torch.float64)
        if sink is not None:  # token 0 takes mass `sink`
            rest = torch.logsumexp(logits[:, 1:], -1)
            logits[:, 0] = rest + torch.log(torch.tensor(sink / (1 - sink), dtype=torch.float64))
        p = logits.softmax(-1)
        b = torch.rand(50, n, generator=g, dtype=torch.float64)
        b[:, 0] *= 100.0  # the sink's logit carries the largest error bound
        delta = signs[None] * b[:, None]                              # (rows, vertices, n)
        jd = p[:, None] * (delta - (p[:, None] * delta).sum(-1, keepdim=True))
        worst = jd.abs().sum(-1).amax(-1)
        bound = softmax_propagated_bound(p, b)
        assert torch.all(worst <= bound * (1 + 1e-12))
        assert torch.all(bound <= 2 * (p * b).sum(-1) * (1 + 1e-12))
        if sink == 0.999:
            assert torch.all(bound < 2 * (p * b).sum(-1) / 20)
            assert torch.all(bound < 3 * worst)  # not vacuous


def test_bound_is_linear_in_u():
    _, res, _ = _trace("gpt2", "bf16", 2, 0)
    b16 = forward_error_bound(res, Policy.uniform("bf16", acc="bf16"))["block_rel"][1]
    f16 = forward_error_bound(res, Policy.uniform("fp16", acc="fp16"))["block_rel"][1]
    torch.testing.assert_close(b16 / f16, torch.full_like(b16, 8.0))


def test_weight_functionals_scale_with_qk():
    model = build_model("gpt2", vocab_size=64, d_model=32, n_layers=1, n_heads=2, seq_len=16, seed=0)
    before = weight_functionals(model, n_heads=2)[0]
    scale_qk(model, 4.0)
    after = weight_functionals(model, n_heads=2)[0]
    assert after["omega_kq"] == pytest.approx(4 * before["omega_kq"])
    assert after["qk_spectral"] == pytest.approx(4 * before["qk_spectral"])
    assert after["omega_ov"] == pytest.approx(before["omega_ov"])
    # hand check of omega_ud = ||W_up||_inf ||W_down||_inf for x -> x W (max absolute column sum)
    mlp = model.transformer.h[0].mlp
    exp_ud = float(mlp.c_fc.weight.detach().abs().sum(0).max() * mlp.c_proj.weight.detach().abs().sum(0).max())
    assert after["omega_ud"] == pytest.approx(exp_ud)


@pytest.mark.parametrize("fmt", ["bf16"])
def test_statistical_estimate_predicts_random_models(arch, fmt):
    """The estimate (independent roundings, random-direction gains) is not a bound, but on random-init models it
    predicts the mean per-token error within a factor 3 at every depth (measured: within 1.5x)."""
    _, res, pol = _trace(arch, fmt, 4, 2)
    est = forward_error_estimate(res, pol)
    for layer in range(4):
        measured = res.token_values[(layer, "block_out", "forward", "rel_l2")].mean()
        assert 1 / 3 < est["block_rel"][layer].mean() / measured < 3, layer


def test_block_terms_norm_conditioning():
    """RMSNorm with unit weights has relative condition bound exactly 1; LayerNorm on mean-dominated inputs
    (a common offset on every coordinate) is ill-conditioned by ~ offset / spread."""
    from exp_roundoff.bounds import block_terms
    from exp_roundoff.models import add_massive_outlier

    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    llama = build_model("llama", vocab_size=64, d_model=32, n_layers=1, n_heads=4, seq_len=16, seed=0)
    terms = block_terms(Tracer(llama, Policy.uniform("bf16"), capture=True).run(ids))[0]
    assert terms["norm1_kappa_max"] == pytest.approx(1.0)
    gpt = build_model("gpt2", vocab_size=64, d_model=32, n_layers=1, n_heads=4, seq_len=16, seed=0)
    base = block_terms(Tracer(gpt, Policy.uniform("bf16"), capture=True).run(ids))[0]["norm1_kappa_mean"]
    add_massive_outlier(gpt, 10.0, dims=tuple(range(32)))
    shifted = block_terms(Tracer(gpt, Policy.uniform("bf16"), capture=True).run(ids))[0]["norm1_kappa_mean"]
    assert base < 2 and shifted > 100


def test_left_padding_bounds_equal_the_unpadded_run(tiny, arch):
    """Left padding: the captured softmax of a fully masked query row is NaN (all logits -inf); the bound and
    the estimate must ignore masked positions, so every value is finite and each real token's bound is the
    one of the same sequence traced without padding (float64 references agree to rounding of the reference
    kernels). Left padding shifts the real tokens' positions by n_pad: GPT-2 takes positions from the token
    index, not the mask, so its position embeddings are zeroed; Llama's rotary tables are computed in float32
    (HF), so the shifted rotation agrees only to ~1e-7 relative in q and k, hence its looser tolerance."""
    model, ids = tiny
    if arch == "gpt2":
        with torch.no_grad():
            model.transformer.wpe.weight.zero_()
    n_pad = 3
    mask = torch.ones_like(ids)
    mask[1, :n_pad] = 0
    pol = Policy.uniform("bf16")
    padded = Tracer(model, pol, capture=True, keep_token_values=True).run(ids, mask)
    alone = Tracer(model, pol, capture=True, keep_token_values=True).run(ids[1:, n_pad:])
    T = ids.shape[1]
    real = slice(T + n_pad, 2 * T)  # tokens of sequence 1 after its padding, in the tracer's (B*T) order
    rtol = 1e-6 if arch == "llama" else 1e-9
    for walk in (forward_error_bound, forward_error_estimate):
        got, ref = walk(padded, pol), walk(alone, pol)
        for layer in range(2):
            assert torch.isfinite(got["block_rel"][layer]).all(), (walk.__name__, layer)
            torch.testing.assert_close(got["block_rel"][layer][real], ref["block_rel"][layer], rtol=rtol, atol=0)
        assert torch.isfinite(got["logits_rel"]).all()
        torch.testing.assert_close(got["logits_rel"][real], ref["logits_rel"], rtol=rtol, atol=0)


def test_omega_kq_is_the_authors_d_model_sum():
    """omega_kq as in the authors' code: per head, W_h as (d_head, d_model), |W_h| summed over d_model, the
    l2 norm over d_head, 2/sqrt(d_head) * max over heads of ||.||(K) ||.||(Q); a plain-loop oracle on a
    hand-built GPT-2 c_attn (Conv1D weight (d_model, 3 d_model)). The head-dimension sum is omega_kq_headsum."""
    d, heads = 4, 2
    dh = d // heads
    model = build_model("gpt2", vocab_size=16, d_model=d, n_layers=1, n_heads=heads, seq_len=8, seed=0)
    w = torch.arange(1, d * 3 * d + 1, dtype=torch.float64).reshape(d, 3 * d) * (-1) ** torch.arange(3 * d)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.copy_(w)

    def loop(q_or_k: int, h: int, over_dmodel: bool) -> float:
        cols = range(q_or_k * d + h * dh, q_or_k * d + (h + 1) * dh)
        if over_dmodel:  # one sum per head column, over the d_model rows
            sums = [sum(abs(float(w[i, j])) for i in range(d)) for j in cols]
        else:
            sums = [sum(abs(float(w[i, j])) for j in cols) for i in range(d)]
        return sum(x * x for x in sums) ** 0.5

    for name, over in (("omega_kq", True), ("omega_kq_headsum", False)):
        expected = 2 / dh**0.5 * max(loop(1, h, over) * loop(0, h, over) for h in range(heads))
        assert weight_functionals(model, n_heads=heads)[0][name] == pytest.approx(expected, rel=1e-12), name
