"""PLPP vs CoOp / CoCoOp / KgCoOp on an offline CLIP trained here, in CoOp's four protocols.

    accelerate launch exp_plpp/run.py                    # quick profile (a smoke test), every stage
    python exp_plpp/run.py --profile small               # the committed CPU results
    python exp_plpp/run.py --profile small --stage table # the summary rows again, from the stages' outputs

Stages (one folder per stage and config hash under <outputs>/exp_plpp/<stage>/<hash>/):
  testbed        compositional image sets: pretraining (seen colour x object pairs) and downstream (all
                 pairs, seen first) + the fixed train/val/test splits                  -> testbed.npz, testbed.json
  pretrain_clip  the offline CLIP (frozen MiniLM + projection, CNN image tower), contrastive, resumable -> clip.pt
  features       normalised image features of every downstream image; zero-shot accuracy per dataset
                 (all / base / novel classes) next to chance                          -> features.pt
  base2novel     16 shots of the base classes; accuracy on base and novel test images, harmonic mean
  fewshot        K shots of every class; accuracy; the source's prompts kept for transfer
  transfer       the source's 16-shot prompts on other datasets (cross-dataset) and shifted digits (DG)
  table          means, 95 % t-intervals over seeds, paired differences <method>_plpp - <method>
Prompt-learning stages write one file per run (atomic), so a killed stage resumes at its first missing run;
under ``accelerate launch --num_processes N`` the runs are shared between the processes.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python exp_plpp/run.py` / `accelerate launch exp_plpp/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from common import paths
from common.results import atomic_write_text
from common.stages import Stage, StageContext, StageInputError, run_experiment
from exp_plpp import datasets as ds
from exp_plpp.config import Config, parse_ablation, parse_tune
from exp_plpp.learn import evaluate, parse_method, train_prompts, transfer
from exp_plpp.offline_clip import OfflineCLIP, normalise_images
from exp_plpp.pretrain import atomic_torch_save, pretrain
from exp_plpp.prompts import PromptLearner
from exp_plpp.table import summary_rows

EXP = "exp_plpp"


def _log(ctx: StageContext, table: str, method: str, metric: str, value: float, seed: int | None = None,
         **params) -> None:
    """A results row; keyword arguments other than the seed are its params."""
    ctx.log(table=table, method=method, metric=metric, value=value, seed=seed, params=params)


# ------------------------------------------------------------------------------------------- testbed
def _needed_datasets(cfg: Config) -> list[str]:
    return sorted({*cfg.protocol.datasets, cfg.protocol.transfer_source, *cfg.protocol.xd_targets,
                   *cfg.protocol.dg_targets})


def _test_subset(labels: np.ndarray, test: np.ndarray, per_class: int) -> np.ndarray:
    """A fixed stratified subset of the test split (every method is evaluated on the same images)."""
    if not per_class:
        return test
    pick = np.sort(ds.few_shot_indices(labels[test], per_class, seed=0))
    return test[np.unique(pick)]   # no repeats: a class with fewer images keeps all of them


def _coop_testbed(ctx: StageContext) -> None:
    """The CoOp benchmark layout under ``coop_root``: its fixed splits, image paths relative to the root."""
    from exp_plpp import coop_layout

    cfg = ctx.cfg
    root = Path(cfg.coop_root).expanduser()
    arrays, meta = {}, {"pretrain": {}, "downstream": {}, "coop": True}
    for name in _needed_datasets(cfg):
        parts = coop_layout.read_split(name, root)
        items = [it for part in ("train", "val", "test") for it in parts[part]]
        labels = np.asarray([it[1] for it in items], dtype=np.int64)
        bounds = np.cumsum([0] + [len(parts[p]) for p in ("train", "val", "test")])
        split = {p: np.arange(bounds[i], bounds[i + 1]) for i, p in enumerate(("train", "val", "test"))}
        split["test"] = _test_subset(labels, split["test"], cfg.testbed.test_per_class)
        names = coop_layout.classnames(items)
        arrays[f"downstream/{name}/labels"] = labels
        meta["downstream"][name] = {
            "classnames": names, "seen": [True] * len(names), "template": coop_layout.ALL_DATASETS[name].template,
            "n": len(items), "paths": [str(Path(it[0]).resolve().relative_to(root.resolve())) for it in items],
            "split": {k: v.tolist() for k, v in split.items()}}
        _log(ctx, table="plpp_testbed", method="downstream", metric="n_images", value=len(items), dataset=name)
        _log(ctx, table="plpp_testbed", method="downstream", metric="n_classes", value=len(names), dataset=name)
    np.savez(ctx.path("testbed.npz"), **arrays)
    ctx.save_json("testbed.json", meta)


def stage_testbed(ctx: StageContext) -> None:
    cfg = ctx.cfg
    if cfg.coop_root:
        return _coop_testbed(ctx)
    need = _needed_datasets(cfg)
    bed = ds.build_testbed(paths.data_dir(), cfg.testbed.colours, cfg.seed, downstream=need,
                           max_pretrain=cfg.testbed.pretrain_cap or None,
                           noise_sigma=cfg.testbed.noise_sigma, blur_sigma=cfg.testbed.blur_sigma)
    arrays, meta = {}, {"pretrain": {}, "downstream": {}}
    for group, sets in bed.items():
        for name, s in sets.items():
            arrays[f"{group}/{name}/images"], arrays[f"{group}/{name}/labels"] = s.images, s.labels
            info = {"classnames": s.classnames, "seen": s.seen.tolist(), "template": s.template, "n": len(s)}
            if group == "downstream":   # CoOp's fixed splits: one per dataset, independent of the run seeds
                split = ds.fixed_split(s.labels, cfg.testbed.p_val, cfg.testbed.p_test, seed=1)
                test = _test_subset(s.labels, split["test"], cfg.testbed.test_per_class)
                info["split"] = {"train": split["train"].tolist(), "val": split["val"].tolist(),
                                 "test": test.tolist()}
            meta[group][name] = info
            _log(ctx, table="plpp_testbed", method=group, metric="n_images", value=len(s), dataset=name)
            _log(ctx, table="plpp_testbed", method=group, metric="n_classes", value=len(s.classnames), dataset=name)
    np.savez(ctx.path("testbed.npz"), **arrays)
    ctx.save_json("testbed.json", meta)


class Testbed:
    """The testbed stage's outputs, read back."""

    def __init__(self, folder: Path):
        try:
            self.meta = json.loads((folder / "testbed.json").read_text(encoding="utf-8"))
            self._npz = np.load(folder / "testbed.npz")
        except (OSError, ValueError) as exc:
            raise StageInputError(f"cannot read the testbed in {paths.repo_relative(folder)}: {exc}. "
                                  "Rerun it with --stage testbed --force") from None

    def arrays(self, group: str, name: str) -> tuple[np.ndarray | None, np.ndarray]:
        """(uint8 images or None for the CoOp layout, whose images stay files), labels."""
        key = f"{group}/{name}/images"
        return (self._npz[key] if key in self._npz.files else None), self._npz[f"{group}/{name}/labels"]

    def pil_images(self, name: str, idx: list[int], root: Path):
        """The images ``idx`` of a downstream set as RGB PIL images (files for the CoOp layout)."""
        from PIL import Image

        x, _ = self.arrays("downstream", name)
        if x is not None:
            return [Image.fromarray(x[i]) for i in idx]
        rel = self.info(name)["paths"]
        return [Image.open(root / rel[i]).convert("RGB") for i in idx]

    def info(self, name: str) -> dict:
        if name not in self.meta["downstream"]:
            raise StageInputError(f"dataset '{name}' is not in the testbed (have: "
                                  f"{', '.join(self.meta['downstream'])})")
        return self.meta["downstream"][name]


def _load_clip(ctx: StageContext):
    """The frozen backbone: real CLIP weights (``clip`` = hub ID or local folder) or the offline CLIP."""
    if ctx.cfg.clip:
        from exp_plpp.clip_hf import HFCLIP

        return HFCLIP.from_pretrained(ctx.cfg.clip).freeze()
    model = OfflineCLIP.build(ctx.cfg.tower, seed=ctx.cfg.seed)
    model.load_trainable_state(torch.load(ctx.input("pretrain_clip") / "clip.pt", weights_only=True))
    return model.freeze()


# ------------------------------------------------------------------------------------------- pretrain_clip
def stage_pretrain_clip(ctx: StageContext) -> None:
    cfg = ctx.cfg
    if cfg.clip:   # real CLIP weights: nothing to pretrain
        ctx.save_json("history.json", {"skipped": "clip weights given", "clip": cfg.clip})
        return
    bed = Testbed(ctx.input("testbed"))
    images, labels, classnames = [], [], []
    for name, info in bed.meta["pretrain"].items():   # one class list over all sets (names are unique)
        x, y = bed.arrays("pretrain", name)
        offset = len(classnames)
        classnames += info["classnames"]
        images.append(x)
        labels.append(y + offset)
    if len(set(classnames)) != len(classnames):
        raise ValueError("pretraining class names collide across sets")
    history: list[dict] = []
    if ctx.is_main:   # one training, not one per process: the others wait at the barrier
        model = OfflineCLIP.build(cfg.tower, seed=cfg.seed)
        history = pretrain(model, np.concatenate(images), np.concatenate(labels), classnames, cfg.pretrain,
                           cfg.seed, ctx.path("state.pt"))
        atomic_torch_save(model.trainable_state(), ctx.path("clip.pt"))
        ctx.save_json("history.json", history)
    ctx.barrier()
    for rec in history:
        for m in ("loss", "train_acc", "temperature"):
            _log(ctx, table="plpp_pretrain", method="offline_clip", metric=m, value=rec[m], epoch=rec["epoch"],
                    n_classes=len(classnames), n_images=int(sum(len(y) for y in labels)))
    _log(ctx, table="plpp_pretrain", method="offline_clip", metric="seconds",
            value=sum(r["seconds"] for r in history))


# ------------------------------------------------------------------------------------------- features
def clip_preprocess(images: list, size: int, mean: tuple, std: tuple) -> torch.Tensor:
    """CLIP's test transform (transformers' CLIPImageProcessor: short side to ``size``, bicubic, centre crop,
    rescale, normalise) for the backbone's own size and statistics."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(mean), image_std=list(std))
    return proc(images=images, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def _clip_features(model, bed: Testbed, name: str, root: Path, batch: int = 64) -> torch.Tensor:
    n = bed.info(name)["n"]
    out = []
    for i in range(0, n, batch):
        ims = bed.pil_images(name, list(range(i, min(n, i + batch))), root)
        x = clip_preprocess(ims, model.image_size, model.image_mean, model.image_std)
        out.append(F.normalize(model.encode_image(x), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def _image_features(model: OfflineCLIP, images: np.ndarray, batch: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = normalise_images(torch.from_numpy(images[i:i + batch]), model.image_mean, model.image_std)
        out.append(F.normalize(model.encode_image(x), dim=-1))
    return torch.cat(out)


def stage_features(ctx: StageContext) -> None:
    if not ctx.is_main:   # cheap: the main process computes and saves, the others wait
        ctx.barrier()
        return
    bed = Testbed(ctx.input("testbed"))
    model = _load_clip(ctx)
    feats = {}
    for name, info in bed.meta["downstream"].items():
        x, y = bed.arrays("downstream", name)
        feats[name] = (_clip_features(model, bed, name, Path(ctx.cfg.coop_root).expanduser()) if ctx.cfg.clip
                       else _image_features(model, x))
        test = torch.tensor(info["split"]["test"])
        n = len(info["classnames"])
        base, novel = ds.base_novel(n)
        for part, classes in (("all", list(range(n))), ("base", base), ("novel", novel)):
            f, lab = _restrict(feats[name][test], torch.from_numpy(y)[test], classes)
            names = [info["classnames"][c] for c in classes]
            acc = evaluate(model, None, f, lab, names, info["template"], "zeroshot")
            _log(ctx, table="plpp_zeroshot", method="zeroshot", metric="acc", value=acc, dataset=name,
                    classes=part, chance=1.0 / len(classes), n_test=len(lab))
    atomic_torch_save(feats, ctx.path("features.pt"))
    ctx.barrier()


def _restrict(features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the images of ``classes``, relabelled 0..len-1 in that order (CoOp's subsample_classes)."""
    new = torch.full((int(labels.max()) + 1 if len(labels) else 1,), -1, dtype=torch.long)
    new[torch.tensor(classes, dtype=torch.long)] = torch.arange(len(classes))
    keep = new[labels] >= 0
    return features[keep], new[labels[keep]]


# ------------------------------------------------------------------------------------------- prompt learning
class Runs:
    """Shared set-up of the prompt-learning stages: the model, the features, one file per finished run."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.bed = Testbed(ctx.input("testbed"))
        self.model = _load_clip(ctx)
        try:
            self.feats = torch.load(ctx.input("features") / "features.pt", weights_only=True)
        except OSError as exc:
            raise StageInputError(f"cannot read features.pt: {exc}. Rerun --stage features --force") from None
        # {dataset: {plpp method: candidate}} chosen on the validation split by stage tune ({} = no tuning)
        self.tuned = (json.loads((ctx.input("tune") / "chosen.json").read_text(encoding="utf-8"))
                      if ctx.has_input("tune") else {})

    def plpp_for(self, name: str, method: str):
        """The PLPP settings of ``method`` on dataset ``name``: the tuned candidate if stage tune chose one."""
        spec = self.tuned.get(name, {}).get(method)
        return dataclasses.replace(self.ctx.cfg.plpp, **parse_tune(spec)) if spec else self.ctx.cfg.plpp

    def split(self, name: str, part: str, classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        info = self.bed.info(name)
        idx = torch.tensor(info["split"][part], dtype=torch.long)
        labels = torch.from_numpy(self.bed.arrays("downstream", name)[1].astype(np.int64))[idx]
        f = self.feats[name][idx]
        return (f, labels) if classes is None else _restrict(f, labels, classes)

    def train(self, name: str, classes: list[int], shots: int, method: str, seed: int, plpp=None):
        """K shots per class of ``classes`` (Dassl's rule, seeded), then prompt learning; ``plpp`` overrides the
        config's PLPP settings (ablations)."""
        info = self.bed.info(name)
        f, y = self.split(name, "train", classes)
        pick = torch.from_numpy(ds.few_shot_indices(y.numpy(), shots, seed))
        cfg = self.ctx.cfg
        t0 = time.perf_counter()
        learner, history = train_prompts(self.model, f[pick], y[pick], [info["classnames"][c] for c in classes],
                                         info["template"], method, cfg.prompt, plpp or self.plpp_for(name, method),
                                         cfg.learn, seed)
        return learner, history, time.perf_counter() - t0

    def base_to_novel(self, name: str, shots: int, method: str, seed: int, plpp=None) -> dict:
        """Train on the base classes, test on base and novel classes: accuracies, their harmonic mean."""
        base, novel = ds.base_novel(len(self.bed.info(name)["classnames"]))
        learner, history, sec = self.train(name, base, shots, method, seed, plpp)
        b, v = self.acc(learner, name, base, method), self.acc(learner, name, novel, method)
        return {"base": b, "novel": v, "hm": _hm(b, v), "history": history, "seconds": sec}

    def acc(self, learner, name: str, classes: list[int], method: str, part: str = "test") -> float:
        info = self.bed.info(name)
        f, y = self.split(name, part, classes)
        cap = self.ctx.cfg.testbed.test_per_class
        if part == "val" and cap:   # a fixed stratified subset, capped as the test split is (stage testbed)
            keep = torch.from_numpy(np.unique(ds.few_shot_indices(y.numpy(), cap, seed=0)))
            f, y = f[keep], y[keep]
        return evaluate(self.model, learner, f, y, [info["classnames"][c] for c in classes], info["template"],
                        method, chunk=self.ctx.cfg.learn.eval_chunk)

    def run_all(self, jobs: list[dict], fn) -> list[dict]:
        """``fn(job) -> result`` for this process's share of the jobs not yet done; every job's result."""
        folder = self.ctx.out_dir / "runs"
        folder.mkdir(parents=True, exist_ok=True)
        mine = [j for j in self.ctx.shard(jobs) if not (folder / f"{j['name']}.json").exists()]
        from tqdm.auto import tqdm

        for job in tqdm(mine, desc=f"[{self.ctx.stage.name}] runs", disable=not self.ctx.is_main, leave=False):
            atomic_write_text(folder / f"{job['name']}.json", json.dumps({**job, **fn(job)}, sort_keys=True))
        self.ctx.barrier()
        return [json.loads((folder / f"{j['name']}.json").read_text(encoding="utf-8")) for j in jobs]


def _hm(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def _methods(cfg: Config, dataset: str, fewshot: bool) -> list[str]:
    methods = (cfg.protocol.fewshot_methods or cfg.protocol.methods) if fewshot else cfg.protocol.methods
    costly = cfg.protocol.cocoop_datasets
    return [m for m in methods if not (costly and parse_method(m)[0] == "cocoop" and dataset not in costly)]


def _jobs(cfg: Config, datasets: list[str], shots: list[int], fewshot: bool) -> list[dict]:
    return [{"name": f"{d}_k{k}_{m}_s{s}", "dataset": d, "shots": k, "method": m, "seed": s}
            for d in datasets for k in shots for m in _methods(cfg, d, fewshot) for s in cfg.protocol.seeds]


def _history_rows(ctx: StageContext, table: str, res: dict, **params) -> None:
    hist = res.get("history") or []
    if hist:
        for k in ("ce", "l_ppl", "l_inv", "kg"):
            _log(ctx, table=table, method=res["method"], metric=f"final_{k}", value=hist[-1][k], **params)
    _log(ctx, table=table, method=res["method"], metric="train_seconds", value=res["seconds"], **params)


def _tune_datasets(cfg: Config) -> list[str]:
    return sorted({*cfg.protocol.datasets, *(cfg.protocol.fewshot_datasets or cfg.protocol.datasets),
                   cfg.protocol.transfer_source})


def stage_tune(ctx: StageContext) -> None:
    """Each ``protocol.tune`` candidate per dataset and PLPP method: trained on the base classes' shots (the
    base-to-novel protocol), scored on the base classes' validation images; the best mean over the seeds (the
    first in list order on a tie) is written to chosen.json for the later stages."""
    cfg = ctx.cfg
    chosen: dict[str, dict[str, str]] = {}
    if not cfg.protocol.tune:
        ctx.save_json("chosen.json", chosen)
        return
    runs = Runs(ctx)

    def one(job: dict) -> dict:
        base, _ = ds.base_novel(len(runs.bed.info(job["dataset"])["classnames"]))
        plpp = dataclasses.replace(cfg.plpp, **parse_tune(job["candidate"]))
        learner, history, sec = runs.train(job["dataset"], base, job["shots"], job["method"], job["seed"], plpp)
        return {"val_acc": runs.acc(learner, job["dataset"], base, job["method"], part="val"), "history": history,
                "seconds": sec}

    jobs = [{"name": f"{d}_{m}_c{i}_s{s}", "dataset": d, "method": m, "candidate": c, "seed": s,
             "shots": cfg.protocol.b2n_shots}
            for d in _tune_datasets(cfg)
            for m in sorted({*_methods(cfg, d, fewshot=False), *_methods(cfg, d, fewshot=True)})
            if parse_method(m)[1] and (not cfg.protocol.tune_methods or m in cfg.protocol.tune_methods)
            for i, c in enumerate(cfg.protocol.tune) for s in cfg.protocol.seeds]
    results = runs.run_all(jobs, one)
    for res in results:
        params = {"dataset": res["dataset"], "seed": res["seed"], "shots": res["shots"], "candidate": res["candidate"]}
        _log(ctx, table="plpp_tune", method=res["method"], metric="val_acc", value=res["val_acc"], **params)
        _history_rows(ctx, "plpp_tune_train", res, **params)
    by_cell: dict[tuple[str, str], dict[str, list[float]]] = {}
    for res in results:
        by_cell.setdefault((res["dataset"], res["method"]), {}).setdefault(res["candidate"], []).append(res["val_acc"])
    for (d, m), cands in sorted(by_cell.items()):
        means = {c: float(np.mean(cands[c])) for c in cfg.protocol.tune}
        best = max(cfg.protocol.tune, key=lambda c: (means[c], -cfg.protocol.tune.index(c)))
        chosen.setdefault(d, {})[m] = best
        for c, v in means.items():
            _log(ctx, table="plpp_tune_choice", method=m, metric="val_acc_mean", value=v, dataset=d, candidate=c)
            _log(ctx, table="plpp_tune_choice", method=m, metric="chosen", value=float(c == best), dataset=d,
                 candidate=c)
    ctx.save_json("chosen.json", chosen)


def stage_base2novel(ctx: StageContext) -> None:
    runs = Runs(ctx)
    cfg = ctx.cfg

    def one(job: dict) -> dict:
        return runs.base_to_novel(job["dataset"], job["shots"], job["method"], job["seed"])

    for res in runs.run_all(_jobs(cfg, cfg.protocol.datasets, [cfg.protocol.b2n_shots], fewshot=False), one):
        params = {"dataset": res["dataset"], "seed": res["seed"], "shots": res["shots"]}
        for m in ("base", "novel", "hm"):
            _log(ctx, table="plpp_b2n", method=res["method"], metric=m, value=res[m], **params)
        _history_rows(ctx, "plpp_b2n_train", res, **params)


def stage_fewshot(ctx: StageContext) -> None:
    runs = Runs(ctx)
    cfg = ctx.cfg
    keep = ctx.out_dir / "prompts"
    keep.mkdir(parents=True, exist_ok=True)
    source_shots = max(cfg.protocol.shots)

    def one(job: dict) -> dict:
        n = len(runs.bed.info(job["dataset"])["classnames"])
        classes = list(range(n))
        learner, history, sec = runs.train(job["dataset"], classes, job["shots"], job["method"], job["seed"])
        if learner is not None and job["dataset"] == cfg.protocol.transfer_source and job["shots"] == source_shots:
            atomic_torch_save(learner.state_dict(), keep / f"{job['name']}.pt")   # for the transfer stage
        return {"acc": runs.acc(learner, job["dataset"], classes, job["method"]), "history": history, "seconds": sec}

    datasets = sorted({*(cfg.protocol.fewshot_datasets or cfg.protocol.datasets), cfg.protocol.transfer_source})
    for res in runs.run_all(_jobs(cfg, datasets, list(cfg.protocol.shots), fewshot=True), one):
        params = {"dataset": res["dataset"], "seed": res["seed"], "shots": res["shots"]}
        _log(ctx, table="plpp_fewshot", method=res["method"], metric="acc", value=res["acc"], **params)
        _history_rows(ctx, "plpp_fewshot_train", res, **params)


def stage_transfer(ctx: StageContext) -> None:
    runs = Runs(ctx)
    cfg = ctx.cfg
    src = cfg.protocol.transfer_source
    shots = max(cfg.protocol.shots)
    src_info = runs.bed.info(src)

    def one(job: dict) -> dict:
        learner = None
        if parse_method(job["method"])[0] != "zeroshot":
            path = ctx.input("fewshot") / "prompts" / f"{src}_k{shots}_{job['method']}_s{job['seed']}.pt"
            if not path.exists():
                raise StageInputError(f"no {shots}-shot prompts of '{src}' for {job['method']} seed {job['seed']} "
                                      f"in the fewshot stage: rerun it with --stage fewshot --force")
            meta_dim = runs.feats[src].shape[1] if parse_method(job["method"])[0] == "cocoop" else None
            learner = PromptLearner(runs.model, src_info["classnames"], cfg.prompt, meta_dim=meta_dim)
            learner.load_state_dict(torch.load(path, weights_only=True), strict=False)
            learner.eval()
        out = {}
        for target in job["targets"]:
            n = len(runs.bed.info(target)["classnames"])
            tl = learner if learner is None else transfer(runs.model, learner, runs.bed.info(target)["classnames"])
            out[target] = runs.acc(tl, target, list(range(n)), job["method"])
        return {"acc": out}

    targets = [("xd", t) for t in cfg.protocol.xd_targets] + [("dg", t) for t in cfg.protocol.dg_targets]
    jobs = [{"name": f"{src}_{m}_s{s}", "source": src, "shots": shots, "method": m, "seed": s,
             "targets": [src] + [t for _, t in targets]} for m in _methods(cfg, src, fewshot=True)
            for s in cfg.protocol.seeds]
    for res in runs.run_all(jobs, one):
        for kind, t in [("source", src), *targets]:
            _log(ctx, table=f"plpp_{kind}", method=res["method"], metric="acc", value=res["acc"][t], source=src,
                    target=t, seed=res["seed"], shots=shots)


def stage_ablations(ctx: StageContext) -> None:
    """Base-to-novel runs of the PLPP method with PLPP's open choices changed, one seed set, same shots; each
    change is applied on top of the settings base2novel uses for that dataset (the tuned candidate when stage
    tune chose one), so ``<ablation> - coop_plpp`` differs in the ablated choice only."""
    runs = Runs(ctx)
    cfg = ctx.cfg
    method = cfg.protocol.ablation_method

    def one(job: dict) -> dict:
        plpp = dataclasses.replace(runs.plpp_for(job["dataset"], method), **parse_ablation(job["ablation"]))
        return runs.base_to_novel(job["dataset"], job["shots"], method, job["seed"], plpp)

    jobs = [{"name": f"{d}_{i}_s{s}", "dataset": d, "shots": cfg.protocol.b2n_shots, "ablation": a, "seed": s,
             "method": f"{method}[{a}]"}
            for d in cfg.protocol.datasets for i, a in enumerate(cfg.protocol.ablations) for s in cfg.protocol.seeds]
    for res in runs.run_all(jobs, one):
        params = {"dataset": res["dataset"], "seed": res["seed"], "shots": res["shots"]}
        for m in ("base", "novel", "hm"):
            _log(ctx, table="plpp_ablation", method=res["method"], metric=m, value=res[m], **params)
        _history_rows(ctx, "plpp_ablation_train", res, **params)


# ------------------------------------------------------------------------------------------- table
def stage_table(ctx: StageContext) -> None:
    for row in summary_rows(_stage_rows(ctx)):
        ctx.log(**row)


def _stage_rows(ctx: StageContext) -> list[dict]:
    """The rows the prompt-learning stages saved with their outputs (rows.jsonl)."""
    rows = []
    for stage in ("base2novel", "fewshot", "transfer", "ablations"):
        if not ctx.has_input(stage):
            continue
        p = ctx.input(stage) / "rows.jsonl"
        if p.exists():
            rows += [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


STAGES = [
    Stage("testbed", stage_testbed, config_keys=("seed", "testbed", "protocol.datasets", "protocol.transfer_source",
                                                 "protocol.xd_targets", "protocol.dg_targets", "coop_root")),
    Stage("pretrain_clip", stage_pretrain_clip, config_keys=("seed", "tower", "pretrain", "clip"),
          inputs=("testbed",), resumable=True),
    Stage("features", stage_features, inputs=("testbed", "pretrain_clip")),
    Stage("tune", stage_tune, config_keys=("prompt", "plpp", "learn", "protocol.methods", "protocol.fewshot_methods",
                                           "protocol.seeds", "protocol.datasets", "protocol.fewshot_datasets",
                                           "protocol.transfer_source", "protocol.b2n_shots",
                                           "protocol.cocoop_datasets", "protocol.tune", "protocol.tune_methods",
                                           "testbed.test_per_class"),
          inputs=("testbed", "pretrain_clip", "features"), resumable=True),
    Stage("base2novel", stage_base2novel, config_keys=("prompt", "plpp", "learn", "protocol.methods",
                                                       "protocol.seeds", "protocol.datasets", "protocol.b2n_shots",
                                                       "protocol.cocoop_datasets"),
          inputs=("testbed", "pretrain_clip", "features", "tune"), resumable=True),
    Stage("fewshot", stage_fewshot, config_keys=("prompt", "plpp", "learn", "protocol.methods", "protocol.seeds",
                                                 "protocol.datasets", "protocol.fewshot_datasets", "protocol.shots",
                                                 "protocol.fewshot_methods", "protocol.cocoop_datasets",
                                                 "protocol.transfer_source"),
          inputs=("testbed", "pretrain_clip", "features", "tune"), resumable=True),
    Stage("transfer", stage_transfer, config_keys=("prompt", "protocol.methods", "protocol.fewshot_methods",
                                                   "protocol.seeds", "protocol.shots", "protocol.cocoop_datasets",
                                                   "protocol.transfer_source", "protocol.xd_targets",
                                                   "protocol.dg_targets"),
          inputs=("testbed", "pretrain_clip", "features", "fewshot"), resumable=True),
    Stage("ablations", stage_ablations, config_keys=("prompt", "plpp", "learn", "protocol.seeds", "protocol.datasets",
                                                     "protocol.b2n_shots", "protocol.ablations",
                                                     "protocol.ablation_method"),
          inputs=("testbed", "pretrain_clip", "features", "tune"), resumable=True,
          version="2"),   # 2: ablations on top of the tuned candidate
    Stage("table", stage_table, inputs=(), optional_inputs=("base2novel", "fewshot", "transfer", "ablations"),
          cache=False),
]


def setup(cfg: Config) -> None:
    torch.set_num_threads(cfg.threads)


def main(argv: list[str] | None = None) -> int:
    return run_experiment(EXP, Config, STAGES, argv=argv, doc=__doc__, setup=setup)


if __name__ == "__main__":
    raise SystemExit(main())
