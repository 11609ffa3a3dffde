"""Round-off bounds for a transformer forward pass: weight functionals and a first-order, per-token bound.

Two kinds of quantities (derivations in README.md, section "Bounds"):

* ``weight_functionals``: the a-priori, weight-only terms of the worst-case analysis, per block, in float64 —
  the authors' omega_kq, omega_ov, omega_ud (as in sbudzinskiy/lowprec-llm-inference: omega_kq sums |W_h|
  over d_model; omega_kq_headsum is the variant summing over the head dimension) plus the spectral norms
  ||W_q,h^T W_k,h||_2, ||W_o||_2 ||W_v||_2, ||W_up||_2 ||W_down||_2.
* ``forward_error_bound``: a first-order (in the unit roundoffs) bound on the l2 error of every token's
  residual stream after every block and of the logits. It composes, op by op, the local rounding error of
  the op (from the policy's formats and the reference activations) with the op's local Lipschitz constant
  (norm: ||gamma||_inf / sigma(x); GEMM: ||W||_2; softmax: ||J||_{inf->1} <= 2; attention output:
  ||dP||_1 max ||v||; activation: max |f'|; residual: 1). Inputs are the reference activations the tracer
  captures (``Tracer(..., capture=True)``); the bound is linear in u, so ``bound / u`` is the depth profile.
"""

from __future__ import annotations

import math

import torch

from common.lowp.formats import get_format
from common.lowp.tracer import OpPrecision, Policy, TraceResult, find_layers, safe_div


# ----------------------------------------------------------------------------------- weight functionals
def _attn_weights(block: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """W_q, W_k, W_v as (d_in, d_out) and W_o as (d_in, d_out) matrices for GPT-2/Llama/OPT blocks."""
    attn = getattr(block, "self_attn", None) or getattr(block, "attn", None)
    if attn is None:
        return None
    if hasattr(attn, "c_attn"):  # GPT-2 Conv1D: weight is (d_in, 3*d_out)
        wq, wk, wv = attn.c_attn.weight.detach().double().chunk(3, dim=1)
        return {"q": wq, "k": wk, "v": wv, "o": attn.c_proj.weight.detach().double()}
    out = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    return {"q": attn.q_proj.weight.detach().double().t(), "k": attn.k_proj.weight.detach().double().t(),
            "v": attn.v_proj.weight.detach().double().t(), "o": out.weight.detach().double().t()}


def _mlp_weights(block: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    mlp = getattr(block, "mlp", None) or block
    if hasattr(mlp, "up_proj"):
        up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().double().t()
        return up, mlp.down_proj.weight.detach().double().t()
    if hasattr(mlp, "c_fc"):
        return mlp.c_fc.weight.detach().double(), mlp.c_proj.weight.detach().double()
    if hasattr(mlp, "fc1"):
        return mlp.fc1.weight.detach().double().t(), mlp.fc2.weight.detach().double().t()
    return None


def _inf(w_kn: torch.Tensor) -> float:
    """||W||_inf of the map x -> x W (x a row vector): the max absolute column sum of W (K, N)."""
    return float(w_kn.abs().sum(0).max())


def weight_functionals(model: torch.nn.Module, n_heads: int, n_kv_heads: int | None = None) -> list[dict]:
    """Per decoder block: omega_kq, omega_ov, omega_ud (authors' inf-norm definitions) and 2-norm analogues."""
    n_kv_heads = n_kv_heads or n_heads
    _, layers = find_layers(model)
    rows = []
    for i, block in enumerate(layers):
        w = _attn_weights(block)
        row: dict = {"layer": i}
        if w is not None:
            d_head = w["q"].shape[1] // n_heads
            rep = n_heads // n_kv_heads
            kq, kq_head, kq2, vmax, v2 = 0.0, 0.0, 0.0, 0.0, 0.0
            for h in range(n_heads):
                sl = slice(h * d_head, (h + 1) * d_head)
                sk = slice((h // rep) * d_head, (h // rep + 1) * d_head)
                wq, wk, wv = w["q"][:, sl], w["k"][:, sk], w["v"][:, sk]
                # authors (compute_omega_kq): W_h as (d_head, d_model), |W_h| summed over d_model, l2 over d_head;
                # here W_h is (d_model, d_head), so the d_model sum is over dim 0
                kq = max(kq, float(wk.abs().sum(0).norm()) * float(wq.abs().sum(0).norm()))
                # our earlier variant: |W_h| summed over d_head, l2 over d_model (~ d_head / d_model of the above)
                kq_head = max(kq_head, float(wk.abs().sum(1).norm()) * float(wq.abs().sum(1).norm()))
                # ||W_q W_k^T||_2 of a rank-d_head product through the QR factors' small R's
                rq, rk = torch.linalg.qr(wq, mode="r")[1], torch.linalg.qr(wk, mode="r")[1]
                kq2 = max(kq2, float(torch.linalg.matrix_norm(rq @ rk.t(), 2)))
                vmax = max(vmax, _inf(wv))
                v2 = max(v2, spectral_norm(wv))
            row.update(omega_kq=2.0 / math.sqrt(d_head) * kq,
                       omega_kq_headsum=2.0 / math.sqrt(d_head) * kq_head, qk_spectral=kq2 / math.sqrt(d_head),
                       omega_ov=_inf(w["o"]) * vmax, ov_spectral=spectral_norm(w["o"]) * v2)
        m = _mlp_weights(block)
        if m is not None:
            row.update(omega_ud=_inf(m[0]) * _inf(m[1]),
                       ud_spectral=spectral_norm(m[0]) * spectral_norm(m[1]))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------- first-order bound
def _u(fmt: str) -> float:
    f = get_format(fmt)
    return 0.0 if f.name == "fp64" else f.unit_roundoff


def _n_acc(p: OpPrecision, k: int) -> int:
    """Roundings of the running sum along a length-k reduction (1: exact sum rounded once)."""
    if p.block_k == 0 or _u(p.acc_fmt) == 0.0:
        return 1
    return math.ceil(k / p.block_k)


def _tok(x: torch.Tensor) -> torch.Tensor:
    """Per-token l2 norms of a (..., d) activation, flattened over the leading dims."""
    return x.reshape(-1, x.shape[-1]).norm(dim=-1)


def _heads_tok(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, dh) -> per-token l2 norms over all heads, flattened (B*T)."""
    return x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], -1).norm(dim=-1)


def spectral_norm(w: torch.Tensor) -> float:
    """||W||_2 via the smaller Gram matrix (fast for LM heads); the 1e-12 margin covers its float64 rounding."""
    g = w.t() @ w if w.shape[0] >= w.shape[1] else w @ w.t()
    return math.sqrt(max(float(torch.linalg.eigvalsh(g)[-1]), 0.0)) * (1 + 1e-12)


def gemm_bound(c: dict, e_in: torch.Tensor, p: OpPrecision) -> torch.Tensor:
    """||dY_t|| <= ||W||_2 e_t + (2u_in + n_acc u_acc) ||(|X||W|)_t|| + u_in ||b|| + (u_acc + u_out) ||Y_t||."""
    x, w, y, b = c["x"], c["w_kn"], c["y"], c["bias"]
    u_in, u_acc, u_out = _u(p.operand_fmt), _u(p.acc_fmt), _u(p.fmt)
    k = w.shape[0]
    x2 = x.reshape(-1, k)
    loc = (2 * u_in + _n_acc(p, k) * u_acc) * (x2.abs() @ w.abs()).norm(dim=-1)
    loc = loc + (u_acc * (b is not None) + u_out) * _tok(y)
    if b is not None:
        loc = loc + u_in * float(b.norm())
    return spectral_norm(w) * e_in + loc


def norm_bound(c: dict, e_in: torch.Tensor, p: OpPrecision) -> torch.Tensor:
    """LayerNorm / RMSNorm: Lipschitz ||gamma||_inf / sigma_t times the input error, plus the rounding of the
    mean, centring, variance, rsqrt, scaling and output (README, "Norms")."""
    x = c["x"].reshape(-1, c["x"].shape[-1])
    y = c["y"].reshape(-1, x.shape[-1])
    d = x.shape[-1]
    ua, uo = _u(p.acc_fmt), _u(p.fmt)
    na = _n_acc(p, d)
    g = c["weight"] if c["weight"] is not None else torch.ones(d, dtype=x.dtype, device=x.device)
    g_inf = float(g.abs().max())
    if c["kind"] == "layernorm":
        cen = x - x.mean(-1, keepdim=True)
        dmu = (na + 1) * ua * x.abs().mean(-1)
        dc = math.sqrt(d) * dmu + ua * cen.norm(dim=-1)
    else:
        cen = x
        dc = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    c2 = cen.norm(dim=-1).clamp_min(1e-300)
    var = c2**2 / d
    sigma = torch.sqrt(var + c["eps"])
    rho = var / (var + c["eps"])
    dv = (na + 2) * ua + 2 * dc / c2
    ds = 0.5 * (rho * dv + ua) + ua
    z = cen / sigma[:, None]
    z2 = z.norm(dim=-1)
    dz = dc / sigma + z2 * (ds + ua)
    gz = (z * g).norm(dim=-1)
    loc = g_inf * dz + (ua + uo) * gz + (ua + uo) * _tok(y)
    if c["kind"] == "rmsnorm":
        loc = loc + uo * g_inf * z2
    if c.get("bias") is not None:
        loc = loc + uo * float(c["bias"].norm())
    return g_inf / sigma * e_in + loc


def softmax_propagated_bound(p: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bound on ||J Δ||_1 over the last dim for every Δ with |Δ_i| <= b_i, J = diag(p) - p pᵀ.

    (JΔ)_i = p_i (Δ_i - pᵀΔ) is invariant to a common shift of Δ, so for any reference index k
    ||JΔ||_1 <= 2 Σ_i p_i |Δ_i - Δ_k| <= 2 [Σ_{i≠k} p_i b_i + (1 - p_k) b_k]. With k = argmax p this is
    tighter than the plain 2 Σ_i p_i b_i whenever p_k > 1/2: an attention sink's own logit error (often the
    largest, since its key is large) is weighted by 1 - p_k instead of p_k ≈ 1."""
    plain = (p * b).sum(-1)
    pk, k = p.max(-1, keepdim=True)
    bk = b.gather(-1, k)
    return 2 * torch.minimum(plain, plain + ((1 - 2 * pk) * bk).squeeze(-1))


def _attention_support(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, keys): the captured probabilities with fully masked rows set to 0 (a left-padding query: the
    captured float64 softmax of an all -inf row is NaN, while the model's SDPA returns 0 there) and the mask
    of keys a query attends to. Masked keys must not enter any term: their probability is exactly 0 in both
    runs, and their error bounds (padding tokens) would otherwise spread as 0 * NaN to every real token."""
    keys = torch.isfinite(c["s"])
    return torch.where(keys, torch.nan_to_num(c["p"], nan=0.0), 0.0), keys


def _masked(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """x broadcast to the (B, H, T, S) score shape, 0 at masked keys (so 0 * inf / NaN cannot arise)."""
    return torch.where(keys, x, 0.0)


def attention_bound(c: dict, eq: torch.Tensor, ek: torch.Tensor, ev: torch.Tensor, policy: Policy) -> torch.Tensor:
    """Scores -> softmax -> P V, per head, with per-token error bounds of q, k, v (after rotary / GQA)."""
    q, k, v, s = c["q"], c["k"], c["v"], c["s"]
    p, finite = _attention_support(c)
    scale = c["scale"]
    B, H, T, dh = q.shape
    S = k.shape[2]
    ps, pm, pv = policy.scores, policy.softmax, policy.value
    cg_s = 2 * _u(ps.operand_fmt) + _n_acc(ps, dh) * _u(ps.acc_fmt)
    cg_v = 2 * _u(pv.operand_fmt) + _n_acc(pv, S) * _u(pv.acc_fmt)
    ua, uo = _u(pm.acc_fmt), _u(pm.fmt)
    eq_ = eq.reshape(B, 1, T, 1)
    ek_ = ek.reshape(B, 1, 1, S)
    ev_ = ev.reshape(B, 1, S)
    qn = q.norm(dim=-1)                       # (B, H, T)
    kn = k.norm(dim=-1)                       # (B, H, S)
    vn = v.norm(dim=-1)                       # (B, H, S)
    s0 = torch.where(finite, s, 0.0)
    ds = scale * (eq_ * kn[:, :, None, :] + qn[..., None] * ek_) + cg_s * scale * qn[..., None] * kn[:, :, None, :] \
        + 2 * _u(ps.fmt) * s0.abs()
    ds = torch.where(finite, ds, 0.0)
    # softmax: propagated ||J ds||_1 (sink-aware, see softmax_propagated_bound); local: |dp_i| <= p_i (u_a |z_i|
    # + 2u_a) plus the relative error of the sum (n_acc + 1) u_a and the output rounding u_o
    z = torch.where(finite, s - s.amax(-1, keepdim=True), 0.0) if policy.shifted_softmax else s0
    pz = (p * z.abs()).sum(-1)
    na = _n_acc(pm, S)
    dp = softmax_propagated_bound(p, ds) + 2 * (ua * pz + 2 * ua) + (na + 1) * ua + uo + ua
    # max ||v_s|| over the keys the query attends to (dp is 0 on masked keys in both runs)
    vmax = _masked(vn[:, :, None, :].expand_as(p), finite).amax(-1)
    do = dp * vmax + _masked(p * ev_[:, :, None, :], finite).sum(-1) + cg_v * (p * vn[:, :, None, :]).sum(-1) \
        + _u(pv.fmt) * c["o"].norm(dim=-1)
    return do.pow(2).sum(1).sqrt().reshape(-1)  # combine heads: (B, T) -> B*T


def _act_lipschitz(c: dict) -> torch.Tensor:
    """Per-token max |f'(x_i)| of the activation at the reference pre-activation (autograd, elementwise f)."""
    x = c["x"].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        c["fn"](x).sum().backward()
    g = x.grad.abs()
    return g.reshape(-1, g.shape[-1]).amax(-1)


class _WorstCase:
    """The first-order worst-case rules (the bound): absolute values, Lipschitz constants, errors add."""

    def embed(self, c: dict, u: float) -> torch.Tensor:
        return u * _tok(c["y"])

    def norm(self, c: dict, e: torch.Tensor, p: OpPrecision) -> torch.Tensor:
        return norm_bound(c, e, p)

    def gemm(self, c: dict, e: torch.Tensor, p: OpPrecision) -> torch.Tensor:
        return gemm_bound(c, e, p)

    def attn(self, c: dict, eq, ek, ev, policy: Policy) -> torch.Tensor:
        return attention_bound(c, eq, ek, ev, policy)

    def act(self, c: dict, e: torch.Tensor, u: float) -> torch.Tensor:
        return _act_lipschitz(c) * e + u * _tok(c["y"])

    def gate(self, c: dict, ea: torch.Tensor, eb: torch.Tensor, u: float) -> torch.Tensor:
        a, b = c["a"].reshape(-1, c["a"].shape[-1]), c["b"].reshape(-1, c["b"].shape[-1])
        return b.abs().amax(-1) * ea + a.abs().amax(-1) * eb + u * _tok(c["y"])

    def add(self, e: torch.Tensor, eb: torch.Tensor, c: dict, u: float) -> torch.Tensor:
        return e + eb + u * _tok(c["y"])


class _Typical:
    """A statistical *estimate* (not a bound): rounding errors independent, mean zero, RMS u/sqrt(3) relative;
    an error vector in a random direction is amplified by the RMS gain of a map (||W||_F / sqrt(K), rms f',
    ||gamma||_rms / sigma), dot products of random directions shrink by 1/sqrt(d); independent terms add in
    quadrature. Mirrors the bound's structure term by term (README, "Estimate")."""

    R3 = math.sqrt(3.0)

    def embed(self, c: dict, u: float) -> torch.Tensor:
        return u / self.R3 * _tok(c["y"])

    def norm(self, c: dict, e: torch.Tensor, p: OpPrecision) -> torch.Tensor:
        x = c["x"].reshape(-1, c["x"].shape[-1])
        y = c["y"].reshape(-1, x.shape[-1])
        d = x.shape[-1]
        ua, uo = _u(p.acc_fmt), _u(p.fmt)
        g = c["weight"] if c["weight"] is not None else torch.ones(d, dtype=x.dtype, device=x.device)
        g_rms = float(g.pow(2).mean().sqrt())
        if c["kind"] == "layernorm":
            sigma = torch.sqrt(x.var(-1, unbiased=False) + c["eps"])
        else:
            sigma = torch.sqrt(x.pow(2).mean(-1) + c["eps"])
        # centring rounds |x_i - mu| ~ |x_i| (mean-dominated inputs: |mu|): absolute u_a |x|, relative to sigma
        centring = ua / self.R3 * (x.pow(2).mean(-1).sqrt() / sigma) * g_rms * math.sqrt(d)
        loc2 = centring**2 + (4 * ua**2 / 3 + uo**2 / 3) * _tok(y) ** 2
        return torch.sqrt((g_rms / sigma * e) ** 2 + loc2)

    def gemm(self, c: dict, e: torch.Tensor, p: OpPrecision) -> torch.Tensor:
        x, w, y, b = c["x"], c["w_kn"], c["y"], c["bias"]
        k = w.shape[0]
        u_in, u_acc, u_out = _u(p.operand_fmt), _u(p.acc_fmt), _u(p.fmt)
        x2 = x.reshape(-1, k)
        n_acc = _n_acc(p, k)
        yn = _tok(y)
        loc2 = (2 * u_in**2 / 3) * (x2.pow(2) @ w.pow(2)).sum(-1) + (u_acc**2 / 3) * (n_acc + 1) / 2 * yn**2 \
            + (u_out**2 / 3) * yn**2 + ((u_acc**2 / 3) * yn**2 if b is not None else 0.0)
        gain = float(w.norm()) / math.sqrt(k)
        return torch.sqrt((gain * e) ** 2 + loc2)

    def attn(self, c: dict, eq, ek, ev, policy: Policy) -> torch.Tensor:
        q, k, v, s = c["q"], c["k"], c["v"], c["s"]
        p, finite = _attention_support(c)
        scale = c["scale"]
        B, H, T, dh = q.shape
        S = k.shape[2]
        ps, pm, pv = policy.scores, policy.softmax, policy.value
        ua, uo = _u(pm.acc_fmt), _u(pm.fmt)
        sh = math.sqrt(H)  # a token's error spread over H heads
        eq_ = (eq / sh).reshape(B, 1, T, 1)
        ek_ = (ek / sh).reshape(B, 1, 1, S)
        ev_ = (ev / sh).reshape(B, 1, S)
        qn, kn, vn = q.norm(dim=-1), k.norm(dim=-1), v.norm(dim=-1)
        s0 = torch.where(finite, s, 0.0)
        ds2 = scale**2 * ((eq_ * kn[:, :, None, :]) ** 2 + (qn[..., None] * ek_) ** 2) / dh \
            + (2 * _u(ps.operand_fmt) ** 2 / 3) * scale**2 * (q.pow(2) @ k.pow(2).transpose(-1, -2)) \
            + (2 * _u(ps.fmt) ** 2 / 3 + _u(ps.acc_fmt) ** 2 / 3) * s0**2
        ds2 = torch.where(finite, ds2, 0.0)
        z = torch.where(finite, s - s.amax(-1, keepdim=True), 0.0) if policy.shifted_softmax else s0
        # dp_i = p_i (ds_i - sum_j p_j ds_j) + p_i theta_i, independent terms in quadrature:
        # Var(ds_i - sum_j p_j ds_j) = (1 - 2 p_i) var_i + sum_j p_j^2 var_j (a sink's own error cancels)
        ds2c = (1 - 2 * p) * ds2 + (p**2 * ds2).sum(-1, keepdim=True)
        dp2 = p**2 * (ds2c + (ua**2 / 3) * (z**2 + 2 + _n_acc(pm, S)) + uo**2 / 3)
        do2 = (dp2 * vn[:, :, None, :] ** 2).sum(-1) + _masked(p**2 * ev_[:, :, None, :] ** 2, finite).sum(-1) \
            + (2 * _u(pv.operand_fmt) ** 2 / 3) * (p**2 @ v.pow(2)).sum(-1) \
            + (_u(pv.acc_fmt) ** 2 / 3 + _u(pv.fmt) ** 2 / 3) * c["o"].pow(2).sum(-1)
        return do2.sum(1).sqrt().reshape(-1)

    def act(self, c: dict, e: torch.Tensor, u: float) -> torch.Tensor:
        x = c["x"].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            c["fn"](x).sum().backward()
        g = x.grad.reshape(-1, x.shape[-1])
        return torch.sqrt((g.pow(2).mean(-1).sqrt() * e) ** 2 + (u**2 / 3) * _tok(c["y"]) ** 2)

    def gate(self, c: dict, ea: torch.Tensor, eb: torch.Tensor, u: float) -> torch.Tensor:
        a, b = c["a"].reshape(-1, c["a"].shape[-1]), c["b"].reshape(-1, c["b"].shape[-1])
        rms_a, rms_b = a.pow(2).mean(-1).sqrt(), b.pow(2).mean(-1).sqrt()
        return torch.sqrt((rms_b * ea) ** 2 + (rms_a * eb) ** 2 + (u**2 / 3) * _tok(c["y"]) ** 2)

    def add(self, e: torch.Tensor, eb: torch.Tensor, c: dict, u: float) -> torch.Tensor:
        return torch.sqrt(e**2 + eb**2 + (u**2 / 3) * _tok(c["y"]) ** 2)


def forward_error_bound(result: TraceResult, policy: Policy) -> dict[str, list]:
    """Per-token first-order l2 error bounds: {"block": [tensor(tokens) per layer], "block_rel": ...,
    "logits", "logits_rel"}; relative = bound / ||reference||_2 per token; tokens in the tracer's order."""
    return _walk(result, policy, _WorstCase())


def forward_error_estimate(result: TraceResult, policy: Policy) -> dict[str, list]:
    """The same walk with the statistical rules of ``_Typical``: a typical-size prediction, not a bound."""
    return _walk(result, policy, _Typical())


def _walk(result: TraceResult, policy: Policy, rules) -> dict[str, list]:
    if not result.captures:
        raise ValueError("forward_error_bound needs Tracer(..., capture=True)")
    parts = [_walk_one_batch(caps, policy, rules) for caps in result.captures]
    out = {}
    for key in parts[0]:
        if isinstance(parts[0][key], list):
            out[key] = [torch.cat([p[key][i] for p in parts]) for i in range(len(parts[0][key]))]
        else:
            out[key] = torch.cat([p[key] for p in parts])
    return out


def _walk_one_batch(caps: dict[int, list[dict]], policy: Policy, rules) -> dict:
    u_e = _u(policy.embed.fmt)
    stream = None
    e = None
    for c in caps.get(-1, []):  # each embedding lookup rounds once; GPT-2/OPT then add token + position
        term = rules.embed(c, u_e)
        e = term if e is None else rules.add(e, term, c, 0.0)
        if c["op"] == "embed_add":
            stream = c["y"]
    if e is None:
        raise ValueError("no embedding captured")
    out = {"block": [], "block_rel": [], "logits": None, "logits_rel": None}
    n_layers = max(k for k in caps if k >= 0)
    for layer in range(n_layers + 1):
        err: dict[str, torch.Tensor] = {}
        proj: dict[str, torch.Tensor] = {}
        for c in caps.get(layer, []):
            op = c["op"]
            if op == "norm":
                err["normed"] = rules.norm(c, e, policy.norm)
            elif op == "qkv":
                eb = rules.gemm(c, err["normed"], policy.qkv)
                if c["name"] in ("c_attn", "query_key_value"):  # the fused GEMM's bound covers each third
                    for key, part in zip("qkv", c["y"].chunk(3, -1)):
                        err[key], proj[key] = eb, part
                else:
                    key = c["name"][0]
                    err[key], proj[key] = eb, c["y"]
            elif op == "attn":
                ratios = {key: _heads_tok(c[key]) / _tok(proj[key]).clamp_min(1e-300) for key in "qkv"}
                err["attn"] = rules.attn(c, err["q"] * ratios["q"], err["k"] * ratios["k"],
                                         err["v"] * ratios["v"], policy)
            elif op == "attn_out":
                err["branch"] = rules.gemm(c, err["attn"], policy.attn_out)
            elif op == "mlp_up":
                key = "gate" if c["name"] in ("gate_proj", "w1") else "up"
                err[key] = rules.gemm(c, err["normed"], policy.mlp_up)
            elif op == "act":
                src = "gate" if "gate" in err else "up"
                err["act"] = rules.act(c, err[src], _u(policy.act.fmt))
                err["mid"] = err["act"]
            elif op == "gate_mul":
                err["mid"] = rules.gate(c, err["act"], err["up"], _u(policy.act.fmt))
            elif op == "mlp_down":
                err["branch"] = rules.gemm(c, err["mid"], policy.mlp_down)
            elif op == "residual":
                e = rules.add(e, err.pop("branch"), c, _u(policy.residual.fmt))
                stream = c["y"]
            elif op == "lm_head":
                out["logits"] = rules.gemm(c, err["normed"], policy.lm_head)
                out["logits_rel"] = safe_div(out["logits"], _tok(c["y"]))
        if layer < n_layers:
            out["block"].append(e.clone())
            out["block_rel"].append(safe_div(e, _tok(stream)))
    return out


def block_terms(result: TraceResult) -> list[dict]:
    """Per block (first batch of a captured trace): the activation-dependent terms of the bound, averaged
    over tokens — norm relative condition numbers ``(||gamma||_inf / sigma) ||x|| / ||y||``, the activation's
    max |f'|, and the residual-stream growth ``||x_out|| / ||x_in||``."""
    caps = result.captures[0]
    rows = []
    n_layers = max(k for k in caps if k >= 0)
    for layer in range(n_layers):
        row: dict = {"layer": layer}
        norms = [c for c in caps[layer] if c["op"] == "norm"]
        for i, c in enumerate(norms):
            x = c["x"].reshape(-1, c["x"].shape[-1])
            g = c["weight"].abs().max() if c["weight"] is not None else 1.0
            cen = x - x.mean(-1, keepdim=True) if c["kind"] == "layernorm" else x
            sigma = torch.sqrt(cen.pow(2).mean(-1) + c["eps"])
            kappa = safe_div(g / sigma * x.norm(dim=-1), _tok(c["y"]))
            row[f"norm{i + 1}_kappa_mean"] = float(kappa.mean())
            row[f"norm{i + 1}_kappa_max"] = float(kappa.max())
        acts = [c for c in caps[layer] if c["op"] == "act"]
        if acts:
            row["act_lipschitz_max"] = float(_act_lipschitz(acts[0]).max())
        resid = [c for c in caps[layer] if c["op"] == "residual"]
        if norms and resid:
            grow = safe_div(_tok(resid[-1]["y"]), _tok(norms[0]["x"]))
            row["residual_growth_mean"] = float(grow.mean())
        rows.append(row)
    return rows
