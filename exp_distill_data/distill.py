"""Trajectory-matching distillation of instruction data (MTT on LoRA parameters; arXiv 2504.09818, part 2).

The synthetic set is ``n_syn`` real examples whose *prompt* positions become learnable embeddings
(``inputs_embeds``) while the answer tokens stay fixed (loss on the answers only, as in fine-tuning).
One outer iteration: start the student at a random expert snapshot θ*_t, take N differentiable SGD steps
on the LoRA parameters with the synthetic batch, and move the embeddings (and the learnable inner rate)
to shrink ‖θ̂_{t+N} − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖² (MTT's normalised loss), plus λ × a neighbour
regulariser that pulls every learnable vector to its nearest row of the frozen embedding matrix.

    syn = build_synthetic(tok, model.get_input_embeddings().weight, examples, sft_cfg)
    traj = load_trajectories([expert_dir, ...])
    state = distill(model, syn, traj, DistillConfig(), out_dir)      # resumes from out_dir/state.pt
    ids, dist = nearest_tokens(state.embeds[syn.learn_mask], E)      # discretise (stage project)

The model must run eager attention: torch's fused SDPA kernels have no double backward
(pytorch/pytorch#116350), and the outer gradient differentiates through the inner gradient.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from common.train import list_snapshots, load_snapshots, trainable_names

IGNORE_INDEX = -100


@dataclass
class DistillConfig:
    """Trajectory matching. Anchor defaults (MTT, CTDancer/qlora, jxmorris12/reverse-training), not the
    paper's: the paper gives none of these (../shared/research/distill.md §3). CPU-sized."""

    syn_steps: int = 2              # N: differentiable inner SGD steps per outer iteration (MTT 20, text-MTT 5)
    expert_span: int = 2            # M: the target is the snapshot M snapshots after the start (MTT 2-3)
    max_start: int = 0              # starts drawn from snapshots [0, max_start); 0 = any with a target
    iterations: int = 40            # outer iterations (MTT 5000, text-MTT 2000)
    batch_syn: int = 8              # synthetic examples per inner step (text-MTT 4; MTT: all)
    # Adam on the embeddings (reverse-training: Adam; MTT: SGD lr 1000 on pixels), as a fraction of the
    # embedding matrix's std: Adam's step is about lr per coordinate whatever the gradient's size, so an
    # absolute rate would mean different things for models with different embedding scales
    lr_embeds: float = 0.1
    lr_lr: float = 1e-2             # Adam on log(inner rate): multiplicative steps keep the rate > 0
    init_lr: float = 0.0            # initial inner rate; 0 = the experts' own rate (MTT: syn_lr = lr_teacher)
    reg: str = "nearest"            # nearest (λ · distance to the nearest token row) | admm | none
    reg_weight: float = 1.0         # λ
    metric: str = "l2"              # l2 | cosine: the regulariser's and the projection's distance
    admm_rho: float = 1.0           # admm: penalty weight ρ
    admm_every: int = 5             # admm: Z and dual updates every k outer iterations
    init: str = "real"              # real (prompt embeddings of real examples) | random
    checkpoint_inner: bool = False  # recompute each inner step in backward (torch.utils.checkpoint)
    min_expert_dist: float = 1e-12  # skip starts where ‖θ*_t − θ*_{t+M}‖² is below this (jxmorris12)
    save_every: int = 10            # outer iterations between resumable states
    seed: int = 0

    def validate(self) -> None:
        if self.syn_steps < 0 or self.expert_span < 1 or self.iterations < 0 or self.batch_syn < 1:
            raise ValueError("distill: syn_steps >= 0, expert_span >= 1, iterations >= 0, batch_syn >= 1 needed")
        if self.reg not in ("nearest", "admm", "none"):
            raise ValueError(f"distill.reg must be nearest|admm|none, got {self.reg!r}")
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"distill.metric must be l2|cosine, got {self.metric!r}")
        if self.init not in ("real", "random"):
            raise ValueError(f"distill.init must be real|random, got {self.init!r}")
        if self.reg_weight < 0 or self.admm_rho <= 0 or self.admm_every < 1 or self.save_every < 1:
            raise ValueError("distill: reg_weight >= 0, admm_rho > 0, admm_every >= 1, save_every >= 1 needed")


# ------------------------------------------------------------------------------------ synthetic set
@dataclass
class SyntheticSet:
    """Padded token sequences (prompt, answer, EOS) of the examples the synthetic set starts from.
    ``learn_mask`` marks the learnable prompt positions (not special tokens such as BOS: they stay
    fixed, as does every answer token); ``embeds`` holds the learnable vectors (rows off the mask are the
    token embeddings and never change)."""

    input_ids: torch.Tensor         # [n, T] long, right-padded
    labels: torch.Tensor            # [n, T] long, -100 on prompt and padding
    attention_mask: torch.Tensor    # [n, T] long
    learn_mask: torch.Tensor        # [n, T] bool
    embeds: torch.Tensor            # [n, T, d] float

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("input_ids", "labels", "attention_mask", "learn_mask", "embeds")}

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor]) -> SyntheticSet:
        return cls(**{k: t[k] for k in ("input_ids", "labels", "attention_mask", "learn_mask", "embeds")})


def build_synthetic(tokenizer: Any, embedding: torch.Tensor, examples: Sequence[Mapping], sft_cfg: Any,
                    init: str = "real", seed: int = 0) -> SyntheticSet:
    """The synthetic set of ``examples`` (tokenised exactly as fine-tuning does, ``common.sft``).
    ``init="real"``: the learnable vectors start as the prompt tokens' embeddings; ``"random"``: Gaussian
    vectors with the embedding matrix's per-dimension mean and std (seeded)."""
    from common.sft import encode_examples, make_collator

    enc = encode_examples(tokenizer, examples, sft_cfg)
    batch = make_collator(tokenizer)(enc)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    special = torch.zeros_like(ids, dtype=torch.bool)
    for sid in set(tokenizer.all_special_ids):
        special |= ids == sid
    learn = (labels == IGNORE_INDEX) & mask.bool() & ~special
    E = embedding.detach()
    embeds = E[ids].clone()
    if init == "random":
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(embeds.shape, generator=g, dtype=E.dtype) * E.std(0) + E.mean(0)
        embeds = torch.where(learn[..., None], noise, embeds)
    elif init != "real":
        raise ValueError(f"init must be real|random, got {init!r}")
    return SyntheticSet(ids, labels, mask, learn, embeds)


def student_inputs(syn: SyntheticSet, embeds: torch.Tensor, embedding: torch.Tensor,
                   rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Model inputs of synthetic rows: learnable vectors on the mask, the frozen token embeddings elsewhere
    (so only masked positions receive gradient)."""
    rows = torch.arange(len(syn)) if rows is None else rows
    ids, learn = syn.input_ids[rows], syn.learn_mask[rows]
    fixed = embedding.detach()[ids]
    x = torch.where(learn[..., None], embeds[rows], fixed)
    return {"inputs_embeds": x, "attention_mask": syn.attention_mask[rows], "labels": syn.labels[rows]}


# -------------------------------------------------------------------------------- nearest neighbours
def nearest_tokens(x: torch.Tensor, embedding: torch.Tensor, metric: str = "l2",
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``x`` [P, d]: the id of the nearest row of ``embedding`` [V, d] and its distance
    (L2: Euclidean, as jxmorris12/reverse-training's ``torch.cdist`` + argmin; cosine: 1 − cos).
    Chunked over rows so that [P, V] never has to fit at once."""
    E = embedding.detach().to(x.dtype)
    ids, dist = [], []
    if metric == "cosine":
        En = torch.nn.functional.normalize(E, dim=-1)
    for i in range(0, x.shape[0], chunk):
        xi = x[i:i + chunk].detach()
        if metric == "l2":
            j = torch.cdist(xi, E).argmin(-1)
            d = (xi - E[j]).norm(dim=-1)   # the distance itself from the difference: 0 on a token row
        elif metric == "cosine":
            j = (torch.nn.functional.normalize(xi, dim=-1) @ En.T).argmax(-1)
            d = _cosine_distance(xi, E[j])
        else:
            raise ValueError(f"metric must be l2|cosine, got {metric!r}")
        ids.append(j)
        dist.append(d)
    if not ids:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=x.dtype)
    return torch.cat(ids), torch.cat(dist)


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # 1 - cos = ½‖â − b̂‖², exactly 0 when a == b (the same normalisation of the same bits)
    an, bn = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    return 0.5 * (an - bn).pow(2).sum(-1)


def neighbour_loss(x: torch.Tensor, embedding: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """The regulariser (a reconstruction, distill.md §2.3): mean over positions of the distance to the
    nearest embedding row, squared L2 or 1 − cos. Differentiable in ``x``; 0 exactly on token rows."""
    if x.numel() == 0:
        return x.sum()
    ids, _ = nearest_tokens(x, embedding, metric)
    target = embedding.detach().to(x.dtype)[ids]
    if metric == "l2":
        return (x - target).pow(2).sum(-1).mean()
    return _cosine_distance(x, target).mean()


# ------------------------------------------------------------------------------------- trajectories
@dataclass
class Trajectories:
    """Expert runs: per run, the matched (trainable) parameters at each snapshot, by name, and the rate."""

    runs: list[list[dict[str, torch.Tensor]]]
    steps: list[list[int]]
    lr: float

    def starts(self, span: int, max_start: int = 0) -> list[tuple[int, int]]:
        """Every (run, snapshot index) with a target ``span`` snapshots later."""
        out = []
        for r, snaps in enumerate(self.runs):
            last = len(snaps) - span
            if max_start:
                last = min(last, max_start)
            out += [(r, t) for t in range(max(last, 0))]
        return out


def load_trajectories(dirs: Sequence[str | Path], lr: float) -> Trajectories:
    """The snapshots ``common.train`` wrote into each expert's folder (``snapshot_every``)."""
    runs, steps = [], []
    for d in dirs:
        snaps = load_snapshots(d)
        if len(snaps) < 2:
            raise ValueError(f"{d}: an expert needs at least 2 snapshots, found {len(list_snapshots(d))}")
        steps.append([s for s, _ in snaps])
        runs.append([t for _, t in snaps])
    return Trajectories(runs, steps, lr)


def flat_distance2(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """‖a − b‖² over every matched parameter (the flat vectors of MTT)."""
    return sum((a[n] - b[n]).pow(2).sum() for n in a)  # type: ignore[return-value]


def matching_loss(student: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
                  target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """MTT's normalised distance ‖θ̂ − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖² (1 at the start point)."""
    return flat_distance2(student, target) / flat_distance2(start, target)


# ------------------------------------------------------------------------------------- inner loop
def causal_lm_loss(model: torch.nn.Module, params: Mapping[str, torch.Tensor], inputs: Mapping) -> torch.Tensor:
    """The fine-tuning loss (mean NLL of the answer tokens, as transformers' causal-LM loss) of ``model``
    with ``params`` swapped in. Computed here, in the logits' dtype (at least fp32), because transformers
    casts logits to fp32 first, which would make a float64 finite-difference check meaningless."""
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = functional_call(model, dict(params), args=(), kwargs=kwargs).logits
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    labels = inputs["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def inner_step(model: torch.nn.Module, names: Sequence[str], lr: torch.Tensor, inputs: Mapping,
               *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One differentiable SGD step θ − α∇ℓ(θ) (the graph of ∇ℓ is kept: ``create_graph``)."""
    theta = dict(zip(names, params))
    loss = causal_lm_loss(model, theta, inputs)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return tuple(p - lr * g for p, g in zip(params, grads))


def unroll(model: torch.nn.Module, start: Mapping[str, torch.Tensor], lr: torch.Tensor,
           batches: Sequence[Mapping], checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """θ̂ after one differentiable SGD step per batch from ``start`` (N = len(batches); N = 0 returns the
    start). ``checkpoint``: each step's activations are recomputed in backward instead of kept."""
    names = list(start)
    params = tuple(start[n].detach().requires_grad_(True) for n in names)
    for inputs in batches:
        if checkpoint:
            from torch.utils.checkpoint import checkpoint as ckpt

            params = ckpt(inner_step, model, names, lr, inputs, *params, use_reentrant=False)
        else:
            params = inner_step(model, names, lr, inputs, *params)
    return dict(zip(names, params))


# ------------------------------------------------------------------------------------- outer loop
@dataclass
class DistillState:
    iteration: int
    embeds: torch.Tensor
    log_lr: torch.Tensor
    history: list[dict] = field(default_factory=list)
    admm_z: torch.Tensor | None = None
    admm_u: torch.Tensor | None = None

    @property
    def lr(self) -> float:
        return float(self.log_lr.detach().exp())


def _save_state(path: Path, state: DistillState, opt: torch.optim.Optimizer, rng: random.Random) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    torch.save({"iteration": state.iteration, "embeds": state.embeds.detach(), "log_lr": state.log_lr.detach(),
                "history": state.history, "admm_z": state.admm_z, "admm_u": state.admm_u,
                "optimizer": opt.state_dict(), "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def _project(x: torch.Tensor, embedding: torch.Tensor, metric: str) -> torch.Tensor:
    ids, _ = nearest_tokens(x, embedding, metric)
    return embedding.detach().to(x.dtype)[ids]


def distill(model: torch.nn.Module, syn: SyntheticSet, traj: Trajectories, cfg: DistillConfig,
            out_dir: str | Path, progress: Callable[[int, dict], None] | None = None) -> DistillState:
    """Learn ``syn``'s prompt embeddings (and the inner rate) by trajectory matching; ``model`` is the
    source with the experts' LoRA adapters (eager attention, dropout off). Resumes from
    ``out_dir/state.pt`` (written every ``save_every`` iterations and at the end, atomically); same
    config and seed give the same result, resumed or not."""
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = set(traj.runs[0][0])
    missing = sorted(names - {n for n, _ in model.named_parameters()})
    if missing or (trainable_names(model) and names != set(trainable_names(model))):
        raise KeyError("the experts' snapshots do not hold the model's trainable parameters "
                       f"(e.g. {(missing or sorted(names ^ set(trainable_names(model))))[:3]}); same LoRA config?")
    model.eval()  # no dropout: the student's steps must be the experts' deterministic SGD steps
    model.requires_grad_(False)
    E = model.get_input_embeddings().weight
    learn = syn.learn_mask
    embeds = syn.embeds.clone().requires_grad_(True)
    log_lr = torch.tensor(math.log(cfg.init_lr or traj.lr), dtype=embeds.dtype, requires_grad=True)
    scale = float(E.detach().float().std())
    opt = torch.optim.Adam([{"params": [embeds], "lr": cfg.lr_embeds * scale}, {"params": [log_lr], "lr": cfg.lr_lr}])
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    state = DistillState(0, embeds, log_lr)
    if cfg.reg == "admm":
        state.admm_z = _project(embeds.detach()[learn], E, cfg.metric)
        state.admm_u = torch.zeros_like(state.admm_z)
    path = out_dir / "state.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        with torch.no_grad():
            embeds.copy_(saved["embeds"])
            log_lr.copy_(saved["log_lr"])
        opt.load_state_dict(saved["optimizer"])
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        state.iteration, state.history = saved["iteration"], saved["history"]
        state.admm_z, state.admm_u = saved["admm_z"], saved["admm_u"]
    starts = traj.starts(cfg.expert_span, cfg.max_start)
    if not starts:
        raise ValueError(f"no expert snapshot has a target {cfg.expert_span} snapshots later "
                         f"({[len(r) for r in traj.runs]} snapshots per expert): lower distill.expert_span")
    while state.iteration < cfg.iterations:
        t0 = time.perf_counter()
        run, t = rng.choice(starts)
        start, target = traj.runs[run][t], traj.runs[run][t + cfg.expert_span]
        norm = float(flat_distance2(start, target))
        rows = [torch.tensor(rng.sample(range(len(syn)), min(cfg.batch_syn, len(syn))))
                for _ in range(cfg.syn_steps)]
        rec: dict[str, Any] = {"iteration": state.iteration, "expert": run, "start": traj.steps[run][t]}
        if norm < cfg.min_expert_dist:
            rec["skipped"] = True  # the experts barely moved: the ratio would be 0/0
        else:
            batches = [student_inputs(syn, embeds, E, r) for r in rows]
            theta = unroll(model, start, log_lr.exp(), batches, cfg.checkpoint_inner)
            tm = matching_loss(theta, start, target) if theta else embeds.sum() * 0
            x = embeds[learn]
            if cfg.reg == "nearest":
                reg = neighbour_loss(x, E, cfg.metric)
            elif cfg.reg == "admm":
                reg = 0.5 * cfg.admm_rho * (x - state.admm_z + state.admm_u).pow(2).sum(-1).mean()
            else:
                reg = x.sum() * 0
            loss = tm + cfg.reg_weight * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec.update(loss=float(loss.detach()), matching=float(tm.detach()), reg=float(reg.detach()), lr=state.lr)
            if cfg.reg == "admm" and (state.iteration + 1) % cfg.admm_every == 0:
                with torch.no_grad():  # scaled-form ADMM: Z = proj(X + U), U += X − Z
                    xd = embeds.detach()[learn]
                    state.admm_z = _project(xd + state.admm_u, E, cfg.metric)
                    state.admm_u = state.admm_u + xd - state.admm_z
        rec["seconds"] = time.perf_counter() - t0
        state.history.append(rec)
        state.iteration += 1
        if progress is not None:
            progress(state.iteration, rec)
        if state.iteration % cfg.save_every == 0 or state.iteration == cfg.iterations:
            _save_state(path, state, opt, rng)
    if cfg.iterations == 0 and not path.is_file():
        _save_state(path, state, opt, rng)
    return state


def write_history(path: str | Path, state: DistillState, cfg: DistillConfig) -> None:
    from common.results import atomic_write_text

    atomic_write_text(Path(path), json.dumps({"config": asdict(cfg), "lr": state.lr, "history": state.history},
                                             sort_keys=True))
