"""Round-off experiments of "Numerical Error Analysis of Large Language Models" (arXiv 2503.10251), small scale.

    python exp_roundoff/run.py --profile quick                      # CPU, all stages
    python exp_roundoff/run.py --profile quick --stage depth,accum  # a subset
    python exp_roundoff/run.py --profile paper                      # larger (GPU or a long CPU run)

Stages (common.stages: each writes its rows and a summary.json into outputs/exp_roundoff/<stage>/<hash>/,
and is skipped when that folder is complete; figures in exp_roundoff/figures.py):
depth (a), estimate (a: the statistical estimate / measured ratio across init std and depth), meanmedian (c),
accum (d), hyper (b), sinks (b: in-model attention sinks), train (e), guidelines (reads the summaries of
meanmedian, accum and hyper from disk). Long loops print one line per finished unit with its time.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from common.config import default_data_dir
from common.data import DatasetNotAvailableError
from common.lowp import quantize
from common.lowp.tracer import Emulator, OpPrecision, Policy, Tracer
from common.stages import Stage, StageContext, run_experiment
from exp_roundoff.authors_sweep import stage_authors_sweep
from exp_roundoff.bounds import block_terms, forward_error_bound, forward_error_estimate, weight_functionals
from exp_roundoff.config import STAGES, Config
from exp_roundoff.models import (
    add_massive_outlier,
    build_model,
    calibrate_sink,
    measure_sink,
    scale_qk,
    scale_residual_projections,
    sink_model,
)

EXP = "exp_roundoff"


# ------------------------------------------------------------------------------------------- helpers
def policy_for(name: str) -> Policy:
    """The named precision recipes of config.PRECISIONS."""
    if name in ("fp32", "bf16", "fp16"):
        return Policy.uniform(name, acc="fp32")
    if name in ("fp8_e4m3", "fp8_e5m2"):
        base = Policy.uniform("bf16", acc="fp32")
        gemm = OpPrecision(fmt="bf16", in_fmt=f"{name}_sat" if name == "fp8_e5m2" else "fp8_e4m3fn_sat",
                           acc_fmt="fp32")
        return base.with_ops(qkv=gemm, scores=gemm, value=gemm, attn_out=gemm, mlp_up=gemm, mlp_down=gemm,
                             lm_head=gemm)
    raise ValueError(f"unknown precision '{name}'")


def text_bytes(corpus: str) -> torch.Tensor:
    root = default_data_dir()
    if root is None:
        raise DatasetNotAvailableError("no offline data root: set LLM4ALL_DATA or pass --data-dir (needs "
                                       f"text/{corpus})")
    path = Path(root) / "text" / corpus
    if not path.is_file():
        raise DatasetNotAvailableError(f"corpus file not found: {path} (config key corpus)")
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()


def byte_batches(data: torch.Tensor, batch: int, seq_len: int, n: int, seed: int) -> list[tuple]:
    """``n`` batches of (batch, seq_len) byte-token windows at seeded random offsets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g)
        out.append((torch.stack([data[s:s + seq_len] for s in starts.tolist()]), None))
    return out


def last_block(res, n_layers: int, metric: str = "rel_l2") -> torch.Tensor:
    return res.token_values[(n_layers - 1, "block_out", "forward", metric)]


def ref_norms(res, layer: int, op: str = "block_out") -> torch.Tensor:
    """Per-token l2 norms of the float64 reference at (layer, op); their minimum is the authors'
    ``min_token_l2`` (a small reference token makes its relative error large)."""
    return res.token_values[(layer, op, "reference", "l2")]


def tstats(v: torch.Tensor) -> dict[str, float]:
    v = v.double()
    f = v[torch.isfinite(v)]
    qs = torch.quantile(f, torch.tensor([0.5, 0.99], dtype=torch.float64)) if f.numel() else [math.nan] * 2
    return {"mean": float(v.mean()), "median": float(qs[0]), "p99": float(qs[1]), "max": float(v.max())}


DEVICE = torch.device("cpu")  # set by main() from cfg.device


def on_device(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(DEVICE)


def trace(model, policy: Policy, batches: list, bound: bool = False, kinds: tuple[str, ...] = ("bound", "estimate")):
    """Trace; with ``bound`` also the first-order bound and/or the statistical estimate (``kinds``)."""
    batches = [(ids.to(DEVICE), None if m is None else m.to(DEVICE)) for ids, m in batches]
    res = Tracer(on_device(model), policy, capture=bound, keep_token_values=True).run_batches(batches)
    if not bound:
        return res, None
    fns = {"bound": forward_error_bound, "estimate": forward_error_estimate}
    return res, {k: fns[k](res, policy) for k in kinds}


class Progress:
    """One line per finished unit of a long loop, with its time and the stage's elapsed time (stages run on
    the main process; a plain line stays readable in a log file where a tqdm bar would not)."""

    def __init__(self, stage: str, total: int):
        self.stage, self.total, self.i = stage, total, 0
        self.start = self.last = time.time()

    def done(self, what: str) -> None:
        now = time.time()
        self.i += 1
        print(f"[{EXP}] {self.stage} {self.i}/{self.total} {what}: {now - self.last:.1f} s "
              f"(stage {now - self.start:.0f} s)", flush=True)
        self.last = now


def log_stats(run: StageContext, table: str, method: str, values: dict[str, float], params: dict, n: int | None = None,
              prefix: str = "") -> None:
    for k, v in values.items():
        run.log(table=table, method=method, metric=f"{prefix}{k}", value=v, n=n, params=params)


# ----------------------------------------------------------------------------------------- stage a
def stage_depth(cfg: Config, run: StageContext, data: torch.Tensor, summary: dict) -> None:
    c = cfg.depth
    batches = byte_batches(data, c.batch, c.seq_len, 1, cfg.seed)
    prog = Progress("depth", len(c.archs) * len(c.depths))
    for arch in c.archs:
        for depth in c.depths:
            per = {p: {"meas": [], "abs": [], "ref": [], "bound": [], "estimate": []} for p in c.precisions}
            for init in range(c.n_inits):
                model = build_model(arch, d_model=c.d_model, n_layers=depth, n_heads=c.n_heads,
                                    seq_len=c.seq_len, seed=cfg.seed * 1000 + init)
                for prec in c.precisions:
                    res, b = trace(model, policy_for(prec), batches, bound=True)
                    per[prec]["meas"].append(last_block(res, depth))
                    per[prec]["abs"].append(last_block(res, depth, "abs_linf"))
                    per[prec]["ref"].append(ref_norms(res, depth - 1))
                    per[prec]["bound"].append(b["bound"]["block_rel"][depth - 1])
                    per[prec]["estimate"].append(b["estimate"]["block_rel"][depth - 1])
            for prec, d in per.items():
                meas, bnd = torch.cat(d["meas"]), torch.cat(d["bound"])
                params = {"arch": arch, "depth": depth, "u": _u_of(prec)}
                log_stats(run, "depth", prec, tstats(meas), params, n=meas.numel(), prefix="measured_")
                # the authors' absolute l-inf error and the smallest reference token norm
                log_stats(run, "depth", prec, tstats(torch.cat(d["abs"])), params, n=meas.numel(),
                          prefix="abs_linf_")
                run.log(table="depth", method=prec, metric="min_token_l2", value=float(torch.cat(d["ref"]).min()),
                        n=meas.numel(), params=params)
                log_stats(run, "depth", prec, {"mean": float(bnd.mean()), "median": float(bnd.median())}, params,
                          n=bnd.numel(), prefix="bound_")
                est = torch.cat(d["estimate"])
                run.log(table="depth", method=prec, metric="estimate_mean", value=float(est.mean()), n=est.numel(),
                        params=params)
                summary.setdefault("depth", {})[(arch, depth, prec)] = float(meas.mean())
            prog.done(f"{arch} L={depth}")
    if c.real_model and c.real_model.lower() != "none":
        stage_depth_real(cfg, run, summary)


def _u_of(prec: str) -> float:
    return {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11, "fp8_e4m3": 2.0**-4, "fp8_e5m2": 2.0**-3}[prec]


def stage_depth_real(cfg: Config, run: StageContext, summary: dict) -> None:
    from common.models import load_causal_lm

    c = cfg.depth
    model, tok = load_causal_lm(c.real_model, dtype=torch.float64)
    text = (Path(default_data_dir()) / "text" / cfg.corpus).read_text(encoding="utf-8")
    ids = tok(text[:20000], return_tensors="pt").input_ids[:, : c.real_tokens]
    n_layers = model.config.num_hidden_layers
    prog = Progress("depth_real", len(c.real_precisions))
    for prec in c.real_precisions:
        res, b = trace(model, policy_for(prec), [(ids, None)], bound=True)
        for layer in range(n_layers):
            meas = res.token_values[(layer, "block_out", "forward", "rel_l2")]
            params = {"model": c.real_model, "layer": layer, "n_tokens": ids.shape[1]}
            log_stats(run, "depth_real", prec, {"mean": float(meas.mean()), "median": float(meas.median()),
                                                "max": float(meas.max())}, params, prefix="measured_")
            absl = res.token_values[(layer, "block_out", "forward", "abs_linf")]
            log_stats(run, "depth_real", prec, {"abs_linf_mean": float(absl.mean()), "abs_linf_max": float(absl.max()),
                                                "min_token_l2": float(ref_norms(res, layer).min())}, params)
            for kind in ("bound", "estimate"):
                run.log(table="depth_real", method=prec, metric=f"{kind}_mean",
                        value=float(b[kind]["block_rel"][layer].mean()), params=params)
        logits = res.token_values[(n_layers, "logits", "forward", "rel_l2")]
        run.log(table="depth_real", method=prec, metric="logits_mean", value=float(logits.mean()),
                params={"model": c.real_model, "layer": n_layers})
        # the activation statistics and per-block terms behind the bounds
        if prec == c.real_precisions[0]:
            terms = block_terms(res)
            wf = weight_functionals(model, model.config.num_attention_heads, model.config.num_key_value_heads)
            for t_row, w_row in zip(terms, wf):
                for key, value in {**t_row, **w_row}.items():
                    if key != "layer":
                        run.log(table="block_terms", method=key, metric="value", value=value,
                                params={"model": c.real_model, "layer": t_row["layer"]})
            for s in res.activation_stats:
                if s["stat"] in ("rmsnorm_cond", "max_prob", "softmax_sensitivity") and 0 <= s["layer"] < n_layers:
                    run.log(table="real_activation_stats", method=s["stat"], metric="max", value=s["max"],
                            params={"model": c.real_model, "layer": s["layer"]})
        summary.setdefault("real", {})[prec] = float(logits.mean())
        prog.done(f"{c.real_model} {prec}")


# ------------------------------------------------------------------------------ stage a: the estimate
HELD_OUT_SEED = 50_000  # model seeds of stage estimate: disjoint from the depth stage's and the tests'


def stage_estimate(cfg: Config, run: StageContext, data: torch.Tensor, summary: dict) -> None:
    """How close the statistical estimate is: estimate / measured mean per-token error of the residual stream
    after the last block, on held-out random models across init std and depth (table ``estimate_check``), and
    its range per init std (table ``estimate_range``: min / max over depths, per arch and over all archs)."""
    c = cfg.estimate
    batches = byte_batches(data, c.batch, c.seq_len, 1, cfg.seed + 6)
    ratios: dict = {}   # (prec, std, arch) -> [(depth, ratio)]
    prog = Progress("estimate", len(c.archs) * len(c.init_stds) * len(c.depths))
    for arch in c.archs:
        for std in c.init_stds:
            for depth in c.depths:
                per = {p: ([], []) for p in c.precisions}
                for init in range(c.n_inits):
                    model = build_model(arch, d_model=c.d_model, n_layers=depth, n_heads=c.n_heads,
                                        seq_len=c.seq_len, init_std=std,
                                        seed=HELD_OUT_SEED + cfg.seed * 1000 + init)
                    for prec in c.precisions:
                        res, b = trace(model, policy_for(prec), batches, bound=True, kinds=("estimate",))
                        per[prec][0].append(last_block(res, depth))
                        per[prec][1].append(b["estimate"]["block_rel"][depth - 1].cpu())
                for prec, (meas, est) in per.items():
                    meas, est = torch.cat(meas), torch.cat(est)
                    ratio = float(est.mean() / meas.mean())
                    params = {"arch": arch, "init_std": std, "depth": depth, "d_model": c.d_model,
                              "n_inits": c.n_inits}
                    log_stats(run, "estimate_check", prec,
                              {"measured_mean": float(meas.mean()), "estimate_mean": float(est.mean()),
                               "ratio": ratio, "token_ratio_median": float((est / meas).median())},
                              params, n=meas.numel())
                    ratios.setdefault((prec, std, arch), []).append((depth, ratio))
                    summary.setdefault("estimate", {})[(arch, std, depth, prec)] = ratio
                prog.done(f"{arch} std={std:g} L={depth}")
    for prec in c.precisions:
        for std in c.init_stds:
            groups = {arch: ratios[(prec, std, arch)] for arch in c.archs}
            groups["all"] = [r for arch in c.archs for r in ratios[(prec, std, arch)]]
            for arch, rs in groups.items():
                if not rs:  # estimate.archs = []
                    continue
                lo, hi = min(rs, key=lambda r: r[1]), max(rs, key=lambda r: r[1])
                log_stats(run, "estimate_range", prec, {"ratio_min": lo[1], "ratio_max": hi[1],
                                                        "depth_at_max": hi[0]},
                          {"arch": arch, "init_std": std}, n=len(rs))


# ----------------------------------------------------------------------------------------- stage c
def stage_meanmedian(cfg: Config, run: StageContext, data: torch.Tensor, summary: dict) -> None:
    """Many random initialisations of a narrow single-head model: the distribution of per-token errors over
    tokens and initialisations (normwise l2 and componentwise), at several init gains (std = gain / sqrt(d))."""
    c = cfg.meanmedian
    batches = byte_batches(data, c.batch, c.seq_len, 1, cfg.seed + 1)
    prog = Progress("meanmedian", len(c.precisions) * len(c.init_gains))
    for prec in c.precisions:
        for gain in c.init_gains:
            tokens: dict[str, list] = {"rel_l2": [], "rel_comp": [], "abs_linf": []}
            init_means, refs = [], []
            for init in range(c.n_inits):
                model = build_model("gpt2", d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads,
                                    seq_len=c.seq_len, init_std=gain / math.sqrt(c.d_model),
                                    seed=cfg.seed * 7919 + init)
                res, _ = trace(model, Policy.uniform(prec, acc=prec), batches)
                for metric in tokens:
                    tokens[metric].append(last_block(res, c.n_layers, metric))
                init_means.append(tokens["rel_l2"][-1].mean())
                refs.append(ref_norms(res, c.n_layers - 1))
            params = {"n_layers": c.n_layers, "d_model": c.d_model, "n_inits": c.n_inits, "init_gain": gain}
            for metric, chunks in tokens.items():
                tok = torch.cat(chunks)
                st = tstats(tok)
                qs = torch.quantile(tok[torch.isfinite(tok)], torch.tensor([0.01, 0.25, 0.75], dtype=torch.float64))
                st.update({"p01": float(qs[0]), "p25": float(qs[1]), "p75": float(qs[2]),
                           "mean_over_median": st["mean"] / st["median"]})
                log_stats(run, "mean_vs_median", prec, st, {**params, "error": metric}, n=tok.numel(),
                          prefix="token_")
                summary.setdefault("meanmedian", {})[(prec, gain, metric)] = st["mean_over_median"]
            im = torch.stack(init_means)
            log_stats(run, "mean_vs_median", prec, {"mean": float(im.mean()), "median": float(im.median()),
                                                     "max": float(im.max())}, {**params, "error": "rel_l2"},
                      n=im.numel(), prefix="init_")
            ref = torch.cat(refs)
            run.log(table="mean_vs_median", method=prec, metric="min_token_l2", value=float(ref.min()),
                    n=ref.numel(), params={**params, "error": "rel_l2"})
            prog.done(f"{prec} gain={gain:g} ({c.n_inits} inits)")


# ----------------------------------------------------------------------------------------- stage d
GROUPS = {
    "none": (), "attention": ("scores", "softmax", "value"), "scores": ("scores",), "softmax": ("softmax",),
    "qkv": ("qkv",), "attn_out": ("attn_out",), "mlp": ("mlp_up", "act", "mlp_down"), "norm": ("norm",),
    "residual": ("residual",), "lm_head": ("lm_head",),
    "all": ("embed", "qkv", "scores", "softmax", "value", "attn_out", "mlp_up", "act", "mlp_down", "norm",
            "residual", "lm_head"),
}


def stage_accum(cfg: Config, run: StageContext, data: torch.Tensor, summary: dict) -> None:
    c = cfg.accum
    batches = byte_batches(data, c.batch, c.seq_len, 1, cfg.seed + 2)
    models = [build_model("gpt2", d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads, seq_len=c.seq_len,
                          seed=cfg.seed * 31 + i) for i in range(c.n_inits)]

    prog = Progress("accum", len(c.accumulators) * len(c.block_sizes) + 2 * len(c.promote_groups))

    def measure(policy: Policy) -> dict[str, float]:
        logits, local, absl, ref = [], [], [], []
        for m in models:
            res, _ = trace(m, policy, batches)
            logits.append(res.token_values[(c.n_layers, "logits", "forward", "rel_l2")])
            local.append(res.token_values[(0, "mlp_down", "local", "rel_l2")])
            absl.append(res.token_values[(c.n_layers, "logits", "forward", "abs_linf")])
            ref.append(ref_norms(res, c.n_layers, "logits"))
        return {"logits_mean": float(torch.cat(logits).mean()), "logits_median": float(torch.cat(logits).median()),
                "gemm_local_mean": float(torch.cat(local).mean()),
                "logits_abs_linf_mean": float(torch.cat(absl).mean()),
                "logits_min_token_l2": float(torch.cat(ref).min())}

    for acc in c.accumulators:
        store = "fp16" if acc == "fp16" else "bf16"
        for bk in c.block_sizes:
            vals = measure(Policy.uniform(store, acc=acc, block_k=bk))
            log_stats(run, "accumulation", f"{store}/acc_{acc}", vals,
                      {"block_k": bk, "storage": store, "accumulator": acc, "K_max": 4 * c.d_model})
            summary.setdefault("accum", {})[(acc, bk)] = vals["logits_mean"]
            prog.done(f"{store}/acc_{acc} block_k={bk}")
    base = Policy.uniform("bf16", acc="fp32")
    hi = OpPrecision(fmt="fp32", acc_fmt="fp32")
    for group in c.promote_groups:
        if group not in GROUPS:
            raise ValueError(f"accum.promote_groups: unknown group '{group}'; known: {sorted(GROUPS)}")
        vals = measure(base.with_ops({op: hi for op in GROUPS[group]}))
        log_stats(run, "high_precision_ops", group, vals, {"baseline": "bf16/acc_fp32", "promoted_to": "fp32"})
        summary.setdefault("promote", {})[group] = vals["logits_mean"]
        prog.done(f"promote {group}")
    # the converse: an fp32 model with one op group fully in bf16 (storage and internals) ranks the ops by
    # the error they contribute on their own
    lo = OpPrecision(fmt="bf16", acc_fmt="bf16")
    fp32 = Policy.uniform("fp32", acc="fp32")
    for group in c.promote_groups:
        vals = measure(fp32.with_ops({op: lo for op in GROUPS[group]}))
        log_stats(run, "low_precision_ops", group, vals, {"baseline": "fp32", "demoted_to": "bf16"})
        summary.setdefault("demote", {})[group] = vals["logits_mean"]
        prog.done(f"demote {group}")


# ----------------------------------------------------------------------------------------- stage b
def stage_hyper(cfg: Config, run: StageContext, data: torch.Tensor, summary: dict) -> None:
    h = cfg.hyper
    pol = policy_for(h.precision)
    prog = Progress("hyper", len(h.widths) + len(h.heads) + len(h.seq_lens) + len(h.init_stds) + len(h.qk_scales)
                    + 2 * (len(h.norm_eps) + len(h.outlier_kinds) * len(h.outliers)) + len(h.resid_scales))

    def one(sweep: str, value, arch=h.arch, d=h.d_model, heads=h.n_heads, seq=h.seq_len, std=0.02, norm=None,
            eps=None, edit=None) -> None:
        batches = byte_batches(data, h.batch, seq, 1, cfg.seed + 3)
        meas, absl, refs, logits, extra = [], [], [], [], {}
        for i in range(h.n_inits):
            model = build_model(arch, d_model=d, n_layers=h.n_layers, n_heads=heads, seq_len=max(seq, 16),
                                init_std=std, norm=norm, norm_eps=eps, seed=cfg.seed * 101 + i)
            if edit is not None:
                edit(model)
            res, _ = trace(model, pol, batches)
            meas.append(last_block(res, h.n_layers))
            absl.append(last_block(res, h.n_layers, "abs_linf"))
            refs.append(ref_norms(res, h.n_layers - 1))
            logits.append(res.token_values[(h.n_layers, "logits", "forward", "rel_l2")])
            if i == 0:
                wf = weight_functionals(model, n_heads=heads)
                extra = {"omega_kq": max(r["omega_kq"] for r in wf), "omega_ud": max(r["omega_ud"] for r in wf)}
                conds = [s["max"] for s in res.activation_stats if s["stat"].endswith("_cond")]
                extra["norm_cond_max"] = max(conds)
                extra["max_prob_mean"] = sum(s["mean"] for s in res.activation_stats if s["stat"] == "max_prob") \
                    / max(1, sum(1 for s in res.activation_stats if s["stat"] == "max_prob"))
        m, lg = torch.cat(meas), torch.cat(logits)
        params = {"sweep": sweep, "value": value, "norm": norm or "layernorm", "arch": arch, "precision": h.precision}
        log_stats(run, "hyper", sweep, {"block_mean": float(m.mean()), "block_median": float(m.median()),
                                        "block_abs_linf_mean": float(torch.cat(absl).mean()),
                                        "block_min_token_l2": float(torch.cat(refs).min()),
                                        "logits_mean": float(lg.mean()), **extra}, params, n=m.numel())
        summary.setdefault("hyper", {})[(sweep, value, norm or "layernorm")] = float(lg.mean())
        prog.done(f"{sweep}={value:g}" + (f" ({norm})" if norm else ""))

    for w in h.widths:
        one("width", w, d=w)
    for nh in h.heads:
        one("heads", nh, heads=nh)
    for s in h.seq_lens:
        one("seq_len", s, seq=s)
    for std in h.init_stds:
        one("init_std", std, std=std)
    for s in h.qk_scales:
        one("qk_scale", s, edit=lambda m, s=s: scale_qk(m, s))
    for norm in ("layernorm", "rmsnorm"):
        for eps in h.norm_eps:
            one("norm_eps", eps, norm=norm, eps=eps)
        for kind in h.outlier_kinds:
            for mag in h.outliers:
                dims = (0,) if kind == "dim" else tuple(range(h.d_model))
                one(f"outlier_{kind}", mag, norm=norm,
                    edit=lambda m, mag=mag, dims=dims: add_massive_outlier(m, mag, dims))
    for s in h.resid_scales:
        one("resid_scale", s, edit=lambda m, s=s: scale_residual_projections(m, s))
    stage_sinks(cfg, run, summary)


def stage_sinks(cfg: Config, run: StageContext, summary: dict) -> None:
    """Softmax alone: rows with one sink logit beta above N(0,1) logits; bf16 shifted vs unshifted evaluation."""
    h = cfg.hyper
    g = torch.Generator().manual_seed(cfg.seed + 4)
    emu = Emulator(Policy())
    p = OpPrecision(fmt=h.precision, acc_fmt=h.precision)
    base = torch.randn(h.sink_rows, h.seq_len, generator=g, dtype=torch.float64)
    for beta in h.sink_logits:
        s = base.clone()
        s[:, 0] += beta
        s = quantize(s, h.precision)
        ref = torch.softmax(s, dim=-1)
        for shifted in (True, False):
            test = emu.softmax(s, p, shifted)
            rel = ((test - ref).norm(dim=-1) / ref.norm(dim=-1))
            # relative error of the non-sink probabilities (the ones a sink squeezes towards underflow)
            rest = ((test - ref)[:, 1:].abs() / ref[:, 1:]).amax(-1)
            params = {"sink_logit": beta, "shifted": shifted, "sink_mass": float(ref[:, 0].mean())}
            run.log(table="softmax_sinks", method="shifted" if shifted else "unshifted", metric="rel_l2_mean",
                    value=float(rel.mean()), params=params)
            run.log(table="softmax_sinks", method="shifted" if shifted else "unshifted", metric="nonsink_comp_max",
                    value=float(rest.max()), params=params)


# ------------------------------------------------------------------------------- stage b: model sinks
def sink_policy(name: str) -> Policy:
    """config.PRECISIONS recipes plus the sinks stage's diagnostic bf16 variants (config.SINK_VARIANTS)."""
    if name == "bf16_softmax_bf16":  # softmax internals (shift, exp, sum) in bf16: the u_a|z_i| term
        return policy_for("bf16").with_ops(softmax=OpPrecision(fmt="bf16", acc_fmt="bf16"))
    if name == "bf16_scores_fp32":  # logits kept in fp32 (bf16 operands): no rounding of the sink logit
        return policy_for("bf16").with_ops(scores=OpPrecision(fmt="fp32", in_fmt="bf16", acc_fmt="fp32"))
    return policy_for(name)


def with_bos(batches: list[tuple]) -> list[tuple]:
    """Token 0 at position 0 (a BOS token: Llama's sink is carried by token 0's embedding)."""
    out = []
    for ids, mask in batches:
        ids = ids.clone()
        ids[:, 0] = 0
        out.append((ids, mask))
    return out


def _sink_errors(res, b: dict | None, n_layers: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Per-token errors of one trace at the non-sink positions t >= 1 (position 0 carries the massive
    activation). Rows of every recorded op are ordered (..., t), so t = row index mod seq_len."""

    def nonsink(v: torch.Tensor) -> torch.Tensor:
        return v[torch.arange(len(v)) % seq_len != 0]

    def layers(op: str, kind: str, metric: str) -> torch.Tensor:
        return torch.cat([nonsink(res.token_values[(i, op, kind, metric)]) for i in range(n_layers)])

    out = {"logits": nonsink(res.token_values[(n_layers, "logits", "forward", "rel_l2")]),
           "logits_abs_linf": nonsink(res.token_values[(n_layers, "logits", "forward", "abs_linf")]),
           "logits_ref_l2": nonsink(ref_norms(res, n_layers, "logits")),
           # componentwise max over a probability row: set by the small (non-sink) probabilities
           "softmax_comp": layers("softmax", "forward", "rel_comp"),
           "softmax_l2": layers("softmax", "forward", "rel_l2"),
           "attn_value": layers("value", "forward", "rel_l2"),
           "attn_value_local": layers("value", "local", "rel_l2")}
    if b is not None:
        out["bound_logits"] = nonsink(b["bound"]["logits_rel"])
        out["estimate_logits"] = nonsink(b["estimate"]["logits_rel"])
    return out


def _mean_sink_params(per_init: list[tuple[float, dict]]) -> dict[str, float]:
    """Mean calibrated strength and measured sink statistics (``sink_mass``, ``sink_gap``, ...) over inits."""
    n = len(per_init)
    return {"strength": sum(s for s, _ in per_init) / n,
            **{f"sink_{k}": sum(m[k] for _, m in per_init) / n for k in per_init[0][1]}}


def _sink_summary(errs: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Means of the pooled per-token errors (+ median / p99 of the logits error; the smallest reference logits
    norm, the authors' min_token_l2)."""
    vals = {f"{k}_mean": float(torch.cat(chunks).mean()) for k, chunks in errs.items() if k != "logits_ref_l2"}
    vals["logits_min_token_l2"] = float(torch.cat(errs["logits_ref_l2"]).min())
    st = tstats(torch.cat(errs["logits"]))
    vals["logits_median"], vals["logits_p99"] = st["median"], st["p99"]
    return vals


def stage_attention_sinks(cfg: Config, run: StageContext, data: torch.Tensor, summary: dict) -> None:
    """Random-init models with an attention sink of calibrated strength (models.add_attention_sink): error
    of each precision vs the sink mass measured on the float64 reference."""
    c = cfg.sinks
    prog = Progress("sinks", len(c.archs) * c.n_inits)
    for arch in c.archs:
        errs: dict = {}     # (target, precision) -> metric -> list of per-token tensors
        sinks: dict = {}    # target -> list of (strength, sink_stats) per init
        for init in range(c.n_inits):
            base = build_model(arch, d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads,
                               seq_len=c.seq_len, seed=cfg.seed * 211 + init, attention_bias=True)
            batches = with_bos(byte_batches(data, c.batch, c.seq_len, 1, cfg.seed + 5 + init))
            # calibrate on other text than the measurement, so the measured mass is an honest check
            calib = with_bos(byte_batches(data, 1, c.seq_len, 1, cfg.seed + 500 + init))
            for target in c.target_masses:
                strength = 0.0 if target == 0 else calibrate_sink(base, target, calib, c.massive, c.query_bias,
                                                                  seed=init)
                model = sink_model(base, strength, c.massive, c.query_bias, seed=init)
                sinks.setdefault(target, []).append((strength, measure_sink(model, batches)))
                for prec in c.precisions:
                    res, b = trace(model, sink_policy(prec), batches, bound=c.bound)
                    for k, v in _sink_errors(res, b, c.n_layers, c.seq_len).items():
                        errs.setdefault((target, prec), {}).setdefault(k, []).append(v)
            prog.done(f"{arch} init {init} ({len(c.target_masses)} sink masses)")
        for (target, prec), d in errs.items():
            vals = _sink_summary(d)
            params = {"arch": arch, "target_mass": target, "n_inits": c.n_inits, "massive": c.massive,
                      **_mean_sink_params(sinks[target])}
            log_stats(run, "attention_sinks", prec, vals, params, n=int(torch.cat(d["logits"]).numel()))
            summary.setdefault("sinks", {})[(arch, target, prec)] = vals["logits_mean"]


# ----------------------------------------------------------------------------------------- stage e
class _FP8Linear(torch.autograd.Function):
    """y = q(x) q(W)^T + b with per-tensor scaled fp8 e4m3 operands; straight-through gradients."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return torch.nn.functional.linear(_fp8(x), _fp8(w), b)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = gy @ w
        gw = gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        gb = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.has_bias else None
        return gx, gw, gb


def _fp8(t: torch.Tensor) -> torch.Tensor:
    """Per-tensor scaling to the e4m3 range (amax -> 448), round, unscale (the usual fp8 training recipe)."""
    amax = t.detach().abs().max().clamp_min(1e-12)
    scale = 448.0 / amax
    return quantize((t * scale).float(), "fp8_e4m3fn_sat").to(t.dtype) / scale


def _train_one(cfg: Config, mode: str, seed: int, data: torch.Tensor) -> float:
    t = cfg.train
    torch.manual_seed(seed)
    from common.models import build_causal_lm

    model = build_causal_lm("llama", vocab_size=256, d_model=t.d_model, n_layers=t.n_layers, n_heads=t.n_heads,
                            max_seq_len=t.seq_len)
    if mode == "fp8_emulated":
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.forward = (lambda x, m=mod: _FP8Linear.apply(x, m.weight, m.bias))
    n_val = len(data) // 10
    train_data, val_data = data[:-n_val], data[-n_val:]
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=(mode == "fp16_loss_scaling"))
    dtype = {"bf16_autocast": torch.bfloat16, "fp16_loss_scaling": torch.float16}.get(mode)
    g = torch.Generator().manual_seed(seed)

    def batch(src: torch.Tensor) -> torch.Tensor:
        starts = torch.randint(0, len(src) - t.seq_len - 1, (t.batch,), generator=g)
        return torch.stack([src[s:s + t.seq_len] for s in starts.tolist()])

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return model(input_ids=ids, labels=ids).loss

    model.train()
    for step in range(t.steps):
        lr = t.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / t.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_of(batch(train_data))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    model.eval()
    g.manual_seed(10_000)  # the same validation windows for every mode and seed
    with torch.no_grad():
        val = [float(loss_of(batch(val_data))) for _ in range(t.eval_batches)]
    return sum(val) / len(val)


def stage_train(cfg: Config, run: StageContext, summary: dict) -> None:
    t = cfg.train
    data = text_bytes(t.corpus)
    prog = Progress("train", len(t.modes) * len(t.seeds))
    for mode in t.modes:
        losses = []
        for seed in t.seeds:
            start = time.time()
            loss = _train_one(cfg, mode, seed, data)
            losses.append(loss)
            run.log(table="mixed_precision_training", method=mode, metric="val_loss", value=loss, seed=seed,
                    params={"steps": t.steps, "d_model": t.d_model},
                    extra={"seconds": round(time.time() - start, 1)})
            prog.done(f"{mode} seed {seed} (val loss {loss:.4f})")
        x = torch.tensor(losses, dtype=torch.float64)
        sd = float(x.std()) if len(losses) > 1 else 0.0
        run.log(table="mixed_precision_training", method=mode, metric="val_loss_mean", value=float(x.mean()),
                stderr=sd / math.sqrt(len(losses)), n=len(losses), params={"steps": t.steps, "d_model": t.d_model})
        summary.setdefault("train", {})[mode] = float(x.mean())


# -------------------------------------------------------------------------------------- guidelines
def stage_guidelines(run: StageContext, summary: dict) -> list[tuple[str, str, float]]:
    """Guidelines with the measured ratio that supports each (only those whose stages ran)."""
    rows: list[tuple[str, str, float]] = []
    pr = summary.get("promote", {})
    if "none" in pr:
        for grp in ("attention", "mlp", "norm", "residual", "lm_head"):
            if grp in pr and pr[grp] > 0:
                rows.append((f"promote_{grp}_to_fp32", "logits error bf16 / with group in fp32", pr["none"] / pr[grp]))
    de = summary.get("demote", {})
    if "all" in de:
        for grp in ("attention", "scores", "softmax", "mlp", "norm", "residual", "lm_head"):
            if grp in de:
                rows.append((f"bf16_error_share_{grp}", "logits error, only this group in bf16 / all in bf16",
                             de[grp] / de["all"]))
    ac = summary.get("accum", {})
    if ("fp32", 0) in ac and ("bf16", 1) in ac:
        rows.append(("accumulate_in_fp32", "logits error acc bf16 strict / acc fp32",
                     ac[("bf16", 1)] / ac[("fp32", 0)]))
    if ("bf16", 1) in ac and ("bf16", 32) in ac:
        rows.append(("block_accumulation_k32", "logits error acc bf16 k=1 / k=32",
                     ac[("bf16", 1)] / ac[("bf16", 32)]))
    hy = summary.get("hyper", {})
    for kind in ("dim", "mean"):
        for norm in ("layernorm", "rmsnorm"):
            vals = sorted((k[1], v) for k, v in hy.items() if k[0] == f"outlier_{kind}" and k[2] == norm)
            if len(vals) >= 2:
                rows.append((f"outlier_{kind}_{norm}", "logits error at largest / no outlier",
                             vals[-1][1] / vals[0][1]))
    qk = sorted((k[1], v) for k, v in hy.items() if k[0] == "qk_scale")
    if len(qk) >= 2:
        rows.append(("bound_qk_scale", "logits error at largest / unit W_q^T W_k scale", qk[-1][1] / qk[0][1]))
    rs = sorted((k[1], v) for k, v in hy.items() if k[0] == "resid_scale")
    if len(rs) >= 2:
        rows.append(("residual_projection_scale", "logits error at largest / smallest scale", rs[-1][1] / rs[0][1]))
    mm = summary.get("meanmedian", {})
    for (prec, gain, metric), ratio in sorted(mm.items()):
        if gain == max(k[1] for k in mm):
            rows.append((f"report_tails_{prec}_{metric}", f"mean / median token error (init gain {gain:g})", ratio))
    for name, evidence, value in rows:
        run.log(table="guidelines", method=name, metric="evidence_ratio", value=value, params={"evidence": evidence})
    return rows


# ------------------------------------------------------------------------------------ stages on disk
def _save_summary(ctx: StageContext, part: dict) -> None:
    """A stage's summary (tuple keys -> value) as summary.json: [[key..., value], ...] per section."""
    ctx.save_json("summary.json", {sec: [[*(k if isinstance(k, tuple) else (k,)), v] for k, v in d.items()]
                                   for sec, d in part.items()})


def load_summary(folder: Path) -> dict:
    """Inverse of ``_save_summary``: section -> {tuple key (or str) -> value}."""
    import json

    raw = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return {sec: {(tuple(r[:-1]) if len(r) > 2 else r[0]): r[-1] for r in rows} for sec, rows in raw.items()}


def _forward_stage(fn):
    """A forward-error stage: reads the corpus bytes, logs rows through the context, saves its summary."""
    def stage(ctx: StageContext) -> None:
        summary: dict = {}
        fn(ctx.cfg, ctx, text_bytes(ctx.cfg.corpus), summary)
        _save_summary(ctx, summary)
    return stage


def _train_stage(ctx: StageContext) -> None:
    summary: dict = {}
    stage_train(ctx.cfg, ctx, summary)
    _save_summary(ctx, summary)


def _guidelines_stage(ctx: StageContext) -> None:
    summary: dict = {}
    for name in ("meanmedian", "accum", "hyper"):
        if ctx.has_input(name):
            summary.update(load_summary(ctx.input(name)))
    rows = stage_guidelines(ctx, summary)
    for name, evidence, value in rows:
        print(f"[{EXP}] guideline {name:32s} {evidence:50s} {value:10.3g}")
    if not rows:
        print(f"[{EXP}] guidelines: no input stage (meanmedian, accum, hyper) is complete for this config")
    ctx.save_json("guidelines.json", [{"name": n, "evidence": e, "value": v} for n, e, v in rows])


FORWARD_KEYS = ("seed", "corpus", "device")   # what every forward-error stage's numbers depend on
STAGE_LIST = [
    Stage("depth", _forward_stage(stage_depth), config_keys=(*FORWARD_KEYS, "depth")),
    Stage("estimate", _forward_stage(stage_estimate), config_keys=(*FORWARD_KEYS, "estimate")),
    Stage("meanmedian", _forward_stage(stage_meanmedian), config_keys=(*FORWARD_KEYS, "meanmedian")),
    Stage("accum", _forward_stage(stage_accum), config_keys=(*FORWARD_KEYS, "accum")),
    Stage("hyper", _forward_stage(stage_hyper), config_keys=(*FORWARD_KEYS, "hyper")),
    Stage("sinks", _forward_stage(stage_attention_sinks), config_keys=(*FORWARD_KEYS, "sinks")),
    Stage("train", _train_stage, config_keys=("train",)),
    # reads whichever of its inputs are complete for this config; cheap, so it always reruns
    Stage("guidelines", _guidelines_stage, optional_inputs=("meanmedian", "accum", "hyper"), cache=False),
    # the authors' one-GEMM-at-a-time mantissa sweep (exp_roundoff/authors_sweep.py)
    Stage("authors_sweep", stage_authors_sweep, config_keys=("seed", "corpus", "device", "authors")),
]
assert tuple(s.name for s in STAGE_LIST) == STAGES


def setup(cfg: Config) -> None:
    global DEVICE
    torch.set_num_threads(cfg.threads)
    DEVICE = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")


def main(argv: list[str] | None = None) -> int:
    return run_experiment(EXP, Config, STAGE_LIST, argv=argv, doc=__doc__, setup=setup)


if __name__ == "__main__":
    raise SystemExit(main())
