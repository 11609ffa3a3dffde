"""LESS (Xia et al. 2024, "LESS: Selecting Influential Data for Targeted Instruction Tuning",
arXiv 2402.04333; code princeton-nlp/LESS): the selection algorithm, independent of how models are trained.

Pipeline (LESS ``less/data_selection/``), one warm-up checkpoint at a time:

1. per-example gradients of the answer-only loss w.r.t. the *trainable* parameters (the LoRA A/B
   matrices of a peft model), flattened into one vector per example (``per_example_grads``): through
   ``torch.func`` (``functional_call`` + ``vmap`` over ``grad``, in chunks) or a per-example backward
   loop, the reference (LESS's own ``obtain_gradients``: batch size 1, ``model(**batch).loss.backward()``);
2. training examples: the Adam update direction from the checkpoint's optimizer state
   (``adam_features``, LESS's ``obtain_gradients_with_adam``); validation examples: the plain gradient;
3. a seeded random projection to ``d`` dimensions (``RandomProjector``; LESS uses TRAK's Rademacher
   projector, d = 8192), generated in tiles from (seed, tile index) so the d x P matrix is never stored,
   scaled by 1/sqrt(d); then L2 normalisation (LESS's ``merge_and_normalize_info``);
4. scores (``less_scores``, LESS's ``matching.py``): cosine of each training feature with each validation
   feature, averaged within a validation subtask, weighted by the checkpoints' learning rates (renormalised
   to sum 1) and summed over checkpoints, max over subtasks; ``select_top_k`` takes the best k.

The model is any causal LM (``transformers``), with or without a peft LoRA adapter; batches are dicts of
already tokenised ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding).

    proj = RandomProjector(dim=8192, seed=0)
    train_f = compute_features(model, train_batches, kind="adam",
                               optimizer_state=adam_state_from_optimizer(opt, model), projector=proj)
    val_f = {s: compute_features(model, b, kind="sgd", projector=proj) for s, b in val_batches.items()}
    scores = less_scores([train_f], [val_f], lrs=[2e-5])
    chosen = select_top_k(scores, k=int(0.05 * len(scores)))
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

Batch = Mapping[str, torch.Tensor]   # input_ids, attention_mask, labels: [B, L]
IGNORE = -100


# ----------------------------------------------------------------------------- per-example gradients

def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters with ``requires_grad``, in ``named_parameters`` order: the order of every flat
    gradient vector, projection row and optimizer-state vector in this module."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameter (requires_grad): nothing to take gradients of")
    return params


def num_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model).values())


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100 (HF's causal-LM loss
    for one example); 0 (and a zero gradient) for an example without any answer token."""
    logits = logits[:-1].to(torch.promote_types(logits.dtype, torch.float32))
    target = labels[1:]
    mask = target != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def _flat(grads: Mapping[str, torch.Tensor], names: Sequence[str], n: int) -> torch.Tensor:
    return torch.cat([grads[k].reshape(n, -1) for k in names], dim=1)


@contextmanager
def _eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """transformers' SDPA/flash mask code branches on tensor values (``padding_mask.all()``), which vmap
    cannot trace; eager attention computes the same function. Switched for the call, then restored."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(impl)


def _func_grads(model: torch.nn.Module, batch: Batch, chunk: int) -> torch.Tensor:
    params = {k: p.detach() for k, p in trainable_parameters(model).items()}

    def loss_one(p, input_ids, attention_mask, labels):
        out = functional_call(model, p, (), {"input_ids": input_ids.unsqueeze(0),
                                             "attention_mask": attention_mask.unsqueeze(0), "use_cache": False})
        return answer_loss(out.logits[0], labels)

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))
    out = []
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for lo in range(0, len(ids), chunk):
        g = per_example(params, ids[lo:lo + chunk], mask[lo:lo + chunk], labels[lo:lo + chunk])
        out.append(_flat(g, list(params), len(ids[lo:lo + chunk])))
    return torch.cat(out)


def _loop_grads(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    params = trainable_parameters(model)
    rows = []
    for i in range(len(batch["input_ids"])):
        one = {k: batch[k][i:i + 1] for k in ("input_ids", "attention_mask", "labels")}
        if not (one["labels"][:, 1:] != IGNORE).any():   # HF's mean over zero tokens is nan
            rows.append(torch.cat([torch.zeros_like(p).flatten() for p in params.values()]))
            continue
        loss = model(**one, use_cache=False).loss          # HF's own loss: an independent reference
        g = torch.autograd.grad(loss, list(params.values()))
        rows.append(torch.cat([x.flatten() for x in g]))
    return torch.stack(rows)


def per_example_grads(model: torch.nn.Module, batch: Batch, method: Literal["func", "loop"] = "func",
                      chunk: int = 8) -> torch.Tensor:
    """[B, P] gradient of each example's answer-only loss w.r.t. the trainable parameters.

    ``method="func"``: ``torch.func`` (vmap over grad, ``chunk`` examples per vmapped call; the model runs
    with eager attention during the call, whatever it was set to); ``"loop"``: one forward/backward per
    example with the model's own loss. Dropout is off (the model is put in eval mode for the call and
    restored), so both are deterministic.
    """
    device = next(model.parameters()).device
    batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
    was_training = model.training
    model.eval()
    try:
        if method == "func":
            with _eager_attention(model):
                return _func_grads(model, batch, chunk)
        if method == "loop":
            return _loop_grads(model, batch)
        raise ValueError(f"method must be 'func' or 'loop', got {method!r}")
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- Adam preconditioning

@dataclass
class AdamState:
    """Flat Adam moments of the trainable parameters at a checkpoint (same order as ``trainable_parameters``).

    ``formula="less"`` is LESS's ``obtain_gradients_with_adam`` exactly: m' = b1 m + (1-b1) g,
    v' = b2 v + (1-b2) g^2, feature m' / sqrt(v' + eps) (no bias correction, eps inside the root).
    ``formula="torch"`` is the step torch.optim.Adam(W) would take next (step t+1, bias-corrected):
    (m'/(1-b1^(t+1))) / (sqrt(v'/(1-b2^(t+1))) + eps). With eps = 0 they would be proportional (equal
    after L2 normalisation); LESS's eps inside the root of the uncorrected v' weighs much more, most of
    all early in training when v' is small.
    """

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    formula: Literal["less", "torch"] = "less"

    def to(self, device: str | torch.device) -> AdamState:
        """A copy with the moments on ``device`` (move once, not per batch)."""
        return AdamState(self.exp_avg.to(device), self.exp_avg_sq.to(device), self.step, self.betas, self.eps,
                         self.formula)


def adam_features(grads: torch.Tensor, state: AdamState) -> torch.Tensor:
    """[B, P] Adam update direction of each example's gradient given the checkpoint's moments."""
    if grads.shape[1] != state.exp_avg.numel():
        raise ValueError(f"gradients have {grads.shape[1]} entries but the Adam state {state.exp_avg.numel()}")
    b1, b2 = state.betas
    m = b1 * state.exp_avg.to(grads) + (1 - b1) * grads
    v = b2 * state.exp_avg_sq.to(grads) + (1 - b2) * grads ** 2
    if state.formula == "less":
        return m / torch.sqrt(v + state.eps)
    if state.formula == "torch":
        t = state.step + 1
        return (m / (1 - b1 ** t)) / (torch.sqrt(v / (1 - b2 ** t)) + state.eps)
    raise ValueError(f"formula must be 'less' or 'torch', got {state.formula!r}")


def _adam_state(per_param: Sequence[Mapping[str, Any]], group: Mapping[str, Any], formula: str) -> AdamState:
    steps = {int(torch.as_tensor(s["step"]).item()) for s in per_param}
    if len(steps) != 1:
        raise ValueError(f"trainable parameters are at different Adam steps {sorted(steps)}")
    return AdamState(torch.cat([s["exp_avg"].detach().flatten() for s in per_param]),
                     torch.cat([s["exp_avg_sq"].detach().flatten() for s in per_param]),
                     steps.pop(), tuple(group.get("betas", (0.9, 0.999))), float(group.get("eps", 1e-8)), formula)


def adam_state_from_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                              formula: Literal["less", "torch"] = "less") -> AdamState:
    """The flat Adam state of a live torch Adam/AdamW optimizer over the model's trainable parameters."""
    params = trainable_parameters(model)
    missing = [n for n, p in params.items() if "exp_avg" not in optimizer.state.get(p, {})]
    if missing:
        raise ValueError(f"the optimizer holds no Adam state for {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                         "(not stepped yet, or not built over these parameters)")
    group = next(g for g in optimizer.param_groups if any(q is next(iter(params.values())) for q in g["params"]))
    return _adam_state([optimizer.state[p] for p in params.values()], group, formula)


def adam_state_from_state_dict(state_dict: Mapping[str, Any], model: torch.nn.Module,
                               param_names: Sequence[str] | None = None,
                               formula: Literal["less", "torch"] = "less") -> AdamState:
    """The flat Adam state from a saved ``optimizer.state_dict()`` (accelerate's ``optimizer.bin``).

    torch numbers the optimizer's parameters 0, 1, ... in the order they were given to it (groups
    concatenated); ``param_names`` lists the model's names in that order, by default the trainable
    parameters in model order (how ``common.train`` builds its AdamW). A state keyed by parameter
    names (as LESS's code reads it) is used as is.
    """
    state = state_dict["state"]
    names = list(trainable_parameters(model))
    groups = state_dict.get("param_groups", [{}])
    if all(isinstance(k, str) for k in state):
        by_name = state
        group = groups[0]
    else:
        order = list(param_names) if param_names is not None else names
        ids = [i for g in groups for i in g["params"]]
        if len(ids) != len(order):
            raise ValueError(f"optimizer state has {len(ids)} parameters, the name list {len(order)}")
        by_name = {n: state[i] for n, i in zip(order, ids)}
        group = next(g for g in groups if ids[order.index(names[0])] in g["params"])
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"optimizer state lacks trainable parameters {missing[:3]}")
    return _adam_state([by_name[n] for n in names], group, formula)


# ----------------------------------------------------------------------------- random projection

TILE_ROWS = 256   # the matrix is generated in tiles of this many rows, each from (seed, tile index)


class RandomProjector:
    """x -> x @ R / sqrt(dim) with R a seeded P x dim Rademacher (+-1) or Gaussian matrix.

    Row r of R depends only on (seed, kind, dim, r // TILE_ROWS): the same seed gives the same
    projection in any process, for any P, block size or device (tiles come from numpy's PCG64 seeded
    by ``SeedSequence([seed, tile, kind])``; Rademacher signs are sent to the device packed 8 per byte
    and expanded there, so they are bit-identical everywhere). ``project`` streams ``block_rows`` rows at a
    time, so the whole matrix is never held; tiles are cached (packed bits for Rademacher, floats for
    Gaussian) up to ``cache_bytes``. ``dtype`` is the arithmetic of the projection (float32 by default;
    LESS/TRAK project in float16); ``device`` where it runs (default: the input's device).
    """

    def __init__(self, dim: int, seed: int = 0, kind: Literal["rademacher", "gaussian"] = "rademacher",
                 block_rows: int = 4 * TILE_ROWS, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, cache_bytes: int = 512 * 2**20):
        if kind not in ("rademacher", "gaussian"):
            raise ValueError(f"kind must be 'rademacher' or 'gaussian', got {kind!r}")
        if dim < 1 or block_rows < 1:
            raise ValueError("dim and block_rows must be positive")
        self.dim, self.seed, self.kind, self.block_rows = dim, seed, kind, block_rows
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._cached = 0
        self._lut: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def signature(self) -> dict:
        """What identifies the matrix (store it with features: features are comparable only when equal)."""
        return {"dim": self.dim, "seed": self.seed, "kind": self.kind, "tile_rows": TILE_ROWS}

    def _raw_tile(self, tile: int, device: torch.device) -> torch.Tensor:
        key = (tile, device)
        if key in self._cache:
            return self._cache[key]
        seq = np.random.SeedSequence([self.seed, tile, int(self.kind == "gaussian")])
        rng = np.random.Generator(np.random.PCG64(seq))
        if self.kind == "rademacher":   # TILE_ROWS * dim bits; TILE_ROWS * dim / 64 is an integer
            raw = torch.from_numpy(rng.bit_generator.random_raw(TILE_ROWS * self.dim // 64).view(np.uint8)).to(device)
        else:
            raw = torch.from_numpy(rng.standard_normal((TILE_ROWS, self.dim), dtype=np.float32)).to(device)
        size = raw.numel() * raw.element_size()
        if self._cached + size <= self.cache_bytes:
            self._cache[key] = raw
            self._cached += size
        return raw

    def _signs(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[256, 8] lookup table: byte -> its 8 signs, bit k first for k = 0..7 (little bit order)."""
        key = (device, dtype)
        if key not in self._lut:
            bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
            self._lut[key] = (1 - 2 * bits).to(dtype).to(device)
        return self._lut[key]

    def rows(self, start: int, stop: int, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows [start, stop) of R (unscaled: entries +-1, or standard normal)."""
        device = torch.device(device)
        first, last = start // TILE_ROWS, (stop - 1) // TILE_ROWS
        raw = [self._raw_tile(t, device) for t in range(first, last + 1)]
        lo = (start - first * TILE_ROWS) * self.dim
        hi = lo + (stop - start) * self.dim
        if self.kind == "gaussian":
            return torch.cat(raw).flatten()[lo:hi].to(dtype).view(stop - start, self.dim)
        # expand only the bytes of the rows asked for (a row holds dim/8 bytes when 8 | dim)
        packed = torch.cat(raw)
        b_lo, b_hi = lo // 8, -(-hi // 8)
        signs = F.embedding(packed[b_lo:b_hi].int(), self._signs(device, dtype)).flatten()
        return signs[lo - 8 * b_lo: hi - 8 * b_lo].view(stop - start, self.dim)

    def matrix(self, num_params: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The whole P x dim matrix R / sqrt(dim), for checks on small P only."""
        return self.rows(0, num_params, dtype=dtype) / math.sqrt(self.dim)

    @torch.no_grad()
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[B, P] -> [B, dim]: x @ R / sqrt(dim), streamed over ``block_rows`` rows of R at a time."""
        device = self.device or x.device
        dtype = self.dtype
        x = x.to(device)
        out = torch.zeros(x.shape[0], self.dim, dtype=dtype, device=device)
        for lo in range(0, x.shape[1], self.block_rows):
            hi = min(lo + self.block_rows, x.shape[1])
            out.addmm_(x[:, lo:hi].to(dtype), self.rows(lo, hi, device, dtype))
        return out / math.sqrt(self.dim)


# ----------------------------------------------------------------------------- features

def iter_features(model: torch.nn.Module, batches: Iterable[Batch], kind: Literal["adam", "sgd"] = "sgd",
                  optimizer_state: AdamState | None = None, projector: RandomProjector | None = None,
                  chunk: int = 8, method: Literal["func", "loop"] = "func",
                  normalize: bool = True) -> Iterator[torch.Tensor]:
    """Yield each batch's features [B, d] (on CPU): gradient (``kind="sgd"``) or Adam update direction
    (``"adam"``, needs ``optimizer_state``), projected when a projector is given (else d = P), then
    L2-normalised. A batch is projected at once: larger batches amortise the matrix generation."""
    if kind == "adam" and optimizer_state is None:
        raise ValueError("kind='adam' needs the checkpoint's optimizer_state (adam_state_from_optimizer/_state_dict)")
    if kind not in ("adam", "sgd"):
        raise ValueError(f"kind must be 'adam' or 'sgd', got {kind!r}")
    for batch in batches:
        g = per_example_grads(model, batch, method=method, chunk=chunk)
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        if kind == "adam":
            g = adam_features(g, optimizer_state)
        if projector is not None:
            g = projector.project(g)
        if normalize:
            g = F.normalize(g, dim=1)
        yield g.cpu()


def compute_features(model: torch.nn.Module, batches: Iterable[Batch], kind: Literal["adam", "sgd"] = "sgd",
                     optimizer_state: AdamState | None = None, projector: RandomProjector | None = None,
                     chunk: int = 8, method: Literal["func", "loop"] = "func", normalize: bool = True) -> torch.Tensor:
    """[n, d] features of all examples of ``batches`` (see ``iter_features``)."""
    feats = list(iter_features(model, batches, kind, optimizer_state, projector, chunk, method, normalize))
    if not feats:
        raise ValueError("no batch given")
    return torch.cat(feats)


def write_feature_shards(model: torch.nn.Module, batches: Iterable[Batch], out_dir: str | Path,
                         rank: int = 0, world_size: int = 1, **feature_kwargs: Any) -> int:
    """Features of each batch into ``out_dir/feats-<batch>.pt`` (atomic writes); batches whose shard
    exists are skipped without computing, so a killed run resumes. ``meta.json`` records the projector
    signature and kind; resuming with different ones is an error. With ``world_size`` > 1 this process
    writes the shards of batches ``rank, rank + world_size, ...`` (the others write the rest; every
    process must iterate the same batches). Returns the number of batches."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    projector = feature_kwargs.get("projector")
    meta = {"projector": projector.signature if projector is not None else None,
            "kind": feature_kwargs.get("kind", "sgd")}
    meta_path = out / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
        raise ValueError(f"{out} holds features made with {meta_path.read_text().strip()}, not {meta}: "
                         "use another folder (features of different projections are not comparable)")
    if rank == 0:
        _atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n"), out, meta_path)
    count = 0
    for i, batch in enumerate(batches):
        count += 1
        path = out / f"feats-{i:06d}.pt"
        if i % world_size != rank or path.exists():
            continue
        feats = next(iter_features(model, [batch], **feature_kwargs))
        _atomic_save(lambda tmp, f=feats: torch.save(f, tmp), out, path)
    return count


def _atomic_save(write: Any, folder: Path, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_feature_shards(out_dir: str | Path) -> torch.Tensor:
    """All shards of ``write_feature_shards`` concatenated in batch order."""
    paths = sorted(Path(out_dir).glob("feats-*.pt"))
    if not paths:
        raise FileNotFoundError(f"no feature shard (feats-*.pt) in {out_dir}")
    missing = sorted(set(range(int(paths[-1].stem.split("-")[1]) + 1)) - {int(p.stem.split("-")[1]) for p in paths})
    if missing:
        raise FileNotFoundError(f"feature shards missing in {out_dir}: " + ", ".join(f"feats-{i:06d}.pt" for i in
                                                                                    missing[:5]))
    return torch.cat([torch.load(p, weights_only=True) for p in paths])


# ----------------------------------------------------------------------------- scores and selection

def less_subtask_scores(train_feats_per_ckpt: Sequence[torch.Tensor],
                        val_feats_per_ckpt_per_subtask: Sequence[Mapping[str, torch.Tensor]],
                        lrs: Sequence[float]) -> tuple[torch.Tensor, list[str]]:
    """([n, S] score of each training example for each validation subtask, subtask names).

    score[i, s] = sum_c w_c * mean_j cos(train_c[i], val_c,s[j]) with w = lrs / sum(lrs) (LESS renormalises
    the checkpoint weights). The mean of cosines is the cosine with the mean of the normalised validation
    features, which is how it is computed.
    """
    if not (len(train_feats_per_ckpt) == len(val_feats_per_ckpt_per_subtask) == len(lrs)) or not lrs:
        raise ValueError(f"need one train tensor, one validation mapping and one lr per checkpoint; got "
                         f"{len(train_feats_per_ckpt)}, {len(val_feats_per_ckpt_per_subtask)}, {len(lrs)}")
    names = list(val_feats_per_ckpt_per_subtask[0])
    if any(list(v) != names for v in val_feats_per_ckpt_per_subtask):
        raise ValueError("every checkpoint needs the same validation subtasks in the same order")
    total = float(sum(lrs))
    if total <= 0 or any(w < 0 for w in lrs):
        raise ValueError(f"checkpoint learning rates must be >= 0 with a positive sum, got {list(lrs)}")
    n = train_feats_per_ckpt[0].shape[0]
    scores = torch.zeros(n, len(names), dtype=torch.float64)
    for train, vals, lr in zip(train_feats_per_ckpt, val_feats_per_ckpt_per_subtask, lrs):
        if train.shape[0] != n:
            raise ValueError("every checkpoint needs features of the same training examples")
        t = F.normalize(train.double(), dim=1)
        centroids = torch.stack([F.normalize(vals[s].double(), dim=1).mean(0) for s in names])
        scores += (lr / total) * (t @ centroids.T)
    return scores, names


def less_scores(train_feats_per_ckpt: Sequence[torch.Tensor],
                val_feats_per_ckpt_per_subtask: Sequence[Mapping[str, torch.Tensor]],
                lrs: Sequence[float]) -> torch.Tensor:
    """[n] LESS score of each training example: the max over validation subtasks of ``less_subtask_scores``."""
    scores, _ = less_subtask_scores(train_feats_per_ckpt, val_feats_per_ckpt_per_subtask, lrs)
    return scores.max(dim=1).values


def select_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, best first; equal scores in index order."""
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if not 0 <= k <= len(scores):
        raise ValueError(f"k={k} outside [0, {len(scores)}]")
    order = torch.sort(-scores.double(), stable=True).indices
    return order[:k]
