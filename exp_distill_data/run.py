"""Instruction-data distillation vs selection (Yao et al., arXiv 2504.09818): data, source and target models,
LoRA fine-tuning, the full / random / LESS baselines at equal budget, and the paper's method, trajectory
matching of pseudo-prompt embeddings with a neighbour regulariser, discretised to nearest-token text and
transferred to another architecture, on ARC-Easy and MMLU.

    accelerate launch exp_distill_data/run.py                      # = --profile quick (a smoke test)
    python exp_distill_data/run.py --profile small                 # the committed CPU table
    accelerate launch --multi_gpu --num_processes 2 exp_distill_data/run.py --profile quick
    python exp_distill_data/run.py --profile paper                 # OPT-1.3B -> Llama by hub IDs (GPU)
    python exp_distill_data/run.py --stage less_select budgets=[0.01,0.05]   # later stages read from disk

Stages (LESS's own order, each with its outputs on disk under outputs/exp_distill_data/<stage>/<hash>/):
data (pool, decontamination, LESS validation) -> source (OPT pretrained offline) -> base_eval ->
less_warmup -> less_features -> less_select -> train (every method x budget x seed) -> evaluate ->
experts (SGD LoRA trajectories of each distiller on the full pool) -> distill (trajectory matching per
variant x budget x seed) -> project (nearest-token ids -> text, inspection.md) -> students (fine-tunes on the
distilled text, and on the embeddings) -> students_eval -> table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

from common.stages import Stage, StageContext, peak_rss_mib, reset_peak_rss, run_experiment
from exp_distill_data.config import OFFLINE_SOURCE, Config, parse_ablation

EXP = "exp_distill_data"
MAIN_TABLE = "distill_main"


# ----------------------------------------------------------------------------------------- helpers
def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def model_ref(name: str, ctx: StageContext) -> str:
    """A setting's model name -> what common.models.load_causal_lm takes (the offline source's folder)."""
    if name != OFFLINE_SOURCE:
        return name
    info = json.loads((ctx.input("source") / "source.json").read_text(encoding="utf-8"))
    return str(ctx.input("source") / "model") if not ctx.cfg.source.hub_id else info["model"]


def load_model(name: str, ctx: StageContext, eager: bool = False):
    from common.models import load_causal_lm

    kw = {"attn_implementation": "eager"} if eager else {}
    model, tok = load_causal_lm(model_ref(name, ctx), **kw)
    if torch.cuda.is_available():  # this process's GPU in a multi-process launch
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return model, tok


def sft_config(cfg: Config, seed: int, n_examples: int | None = None, world_size: int = 1, **changes: Any):
    """The fine-tuning config of every trained model (``n_examples``: a batch never larger than the set).

    ``finetune.batch_size`` is the global batch: with ``world_size`` processes each takes its share, so a
    multi-process run makes the same updates on the same examples as a single process.
    """
    from common.sft import SFTConfig

    f = cfg.finetune
    if f.batch_size % world_size:
        raise ValueError(f"finetune.batch_size: the global batch {f.batch_size} does not split over {world_size} "
                         "processes; use a multiple of the process count")
    batch = f.batch_size
    if n_examples and n_examples < batch:  # a small set: one batch of (almost) all of it
        batch = max(world_size, n_examples - n_examples % world_size)
    batch //= world_size
    base = dict(method=f.method, r=f.r, alpha=f.alpha, dropout=f.dropout, lr=f.lr, epochs=f.epochs,
                warmup_ratio=f.warmup_ratio, lr_schedule=f.lr_schedule, batch_size=batch,
                grad_accum=f.grad_accum, max_len=f.max_len, mixed_precision=f.mixed_precision,
                template=f.template, plain_template=f.plain_template, plain_template_input=f.plain_template,
                log_with="none", seed=seed, checkpoint_every=f.checkpoint_every, keep_checkpoints=1)
    base.update(changes)
    return SFTConfig(**base)


def budget_size(b: float, pool_size: int) -> int:
    return max(1, int(b * pool_size)) if b < 1 else min(pool_size, int(b))


def load_pool(ctx: StageContext) -> tuple[list[dict], dict[str, list[dict]]]:
    folder = ctx.input("data")
    return read_jsonl(folder / "pool.jsonl"), json.loads((folder / "validation.json").read_text(encoding="utf-8"))


def selectors(cfg: Config) -> list[str]:
    return sorted({s for s, _ in cfg.pairs()})


def trainers(cfg: Config) -> list[str]:
    return sorted({t for _, t in cfg.pairs()})


# ---------------------------------------------------------------------------------------- stage: data
def stage_data(ctx: StageContext) -> None:
    from common.data import mmlu_subjects
    from exp_distill_data import data

    cfg, d = ctx.cfg, ctx.cfg.data
    pool = data.build_pool([*d.sources, *d.extra_pools], mmlu_aux_limit=d.mmlu_aux_limit or None, seed=cfg.seed,
                           prompt_format="eval")
    if d.arc_limit:  # seeded subsample of ARC-Easy train, the pool's order kept
        arc = [i for i, ex in enumerate(pool) if ex["source"] == "arc_easy"]
        keep = set(random.Random(cfg.seed).sample(arc, min(d.arc_limit, len(arc))))
        pool = [ex for i, ex in enumerate(pool) if ex["source"] != "arc_easy" or i in keep]
    pool, report = data.decontaminate(pool, data.eval_index(data.eval_texts(), d.ngram), d.ngram)
    subjects = mmlu_subjects("dev")
    if d.val_subjects:
        subjects = sorted(random.Random(cfg.seed).sample(subjects, min(d.val_subjects, len(subjects))))
    pool, val = data.split_validation(pool, d.val_per_subtask, cfg.seed, prompt_format="eval", subjects=subjects)
    if ctx.is_main:
        write_jsonl(ctx.path("pool.jsonl"), pool)
    ctx.save_json("validation.json", val)
    ctx.save_json("decontamination.json", report)
    for source, rep in report["sources"].items():
        p = {"source": source, "ngram": d.ngram}
        ctx.log(table="distill_decontam", method=source, metric="contaminated_fraction", value=rep["fraction"],
                n=rep["n"], params=p)
        ctx.log(table="distill_decontam", method=source, metric="contaminated", value=rep["n_contaminated"],
                n=rep["n"], params=p)
    ctx.log(table="distill_data", method="pool", metric="examples", value=len(pool))
    ctx.log(table="distill_data", method="validation", metric="subtasks", value=len(val))
    print(f"[{EXP}] pool {len(pool)} examples after decontamination (dropped {report['n_contaminated']}); "
          f"LESS validation: {len(val)} subtasks")


# -------------------------------------------------------------------------------------- stage: source
def stage_source(ctx: StageContext) -> None:
    from exp_distill_data.source import pretrain_source

    if OFFLINE_SOURCE not in {m for pair in ctx.cfg.pairs() for m in pair}:
        ctx.save_json("source.json", {"skipped": f"no setting uses {OFFLINE_SOURCE}"})
        return
    info = pretrain_source(ctx.cfg.source, ctx.out_dir, run=ctx)
    print(f"[{EXP}] source: val ppl {info['val_ppl']:.1f} (unigram {info['unigram_ppl']:.1f}), "
          f"{info['params'] / 1e6:.2f} M parameters, {info['train_tokens']} tokens")


# ---------------------------------------------------------------------------------------- evaluation
def evaluate_model(model: Any, tok: Any, cfg: Config) -> dict[str, dict]:
    """acc / acc_norm per task: ARC-Easy 0-shot and MMLU at each of eval.mmlu_shots (fast lm-eval backend)."""
    from common.eval import evaluate_multiple_choice

    e = cfg.eval
    out: dict[str, dict] = {}
    if "arc_easy" in e.tasks:
        out.update(evaluate_multiple_choice(model, tok, ["arc_easy"], subsample=e.arc_questions or None,
                                            subsample_seed=e.subsample_seed, batch_size=e.batch_size))
    if "mmlu" in e.tasks:
        for shots in e.mmlu_shots:
            s = evaluate_multiple_choice(model, tok, ["mmlu"], num_fewshot=shots, subsample=e.mmlu_questions or None,
                                         subsample_seed=e.subsample_seed, batch_size=e.batch_size)
            out.update({f"{k}@{shots}shot": v for k, v in s.items()})
    return out


def log_eval(ctx: StageContext, scores: dict[str, dict], method: str, params: dict) -> None:
    for task, s in scores.items():
        name = task.split("@")[0]
        for m in ("acc", "acc_norm"):
            se = s.get(f"{m}_stderr")
            ctx.log(table=MAIN_TABLE, method=method, metric=m, value=float(s[m]),
                    stderr=None if se is None or math.isnan(se) else float(se), n=int(s["n"]),
                    params={**params, "task": name, "num_fewshot": int(s.get("num_fewshot", 0))})


def run_eval_jobs(ctx: StageContext, jobs: list[tuple[str, Any]]) -> dict[str, dict]:
    """Evaluate ``(name, load)`` jobs (``load() -> (model, tokenizer)``), shared out over the processes;
    each result is its own file (``scores/<name>.json``, atomic), so a killed stage resumes at the first
    job without one. Returns every job's scores, in job order, on every process."""
    from common.results import atomic_write_text

    folder = ctx.out_dir / "scores"
    folder.mkdir(parents=True, exist_ok=True)
    mine = ctx.shard(jobs)
    for i, (name, load) in enumerate(mine, 1):
        done = folder / f"{name}.json"
        if done.is_file():
            continue
        print(f"[{EXP}] evaluate {i}/{len(mine)} {name}" + (f" (rank {ctx.rank})" if ctx.world_size > 1 else ""),
              flush=True)
        model, tok = load()
        atomic_write_text(done, json.dumps(evaluate_model(model.eval(), tok, ctx.cfg), sort_keys=True))
        del model
    ctx.barrier()
    return {name: json.loads((folder / f"{name}.json").read_text(encoding="utf-8")) for name, _ in jobs}


def pair_params(selector: str, trainer: str) -> dict:
    return {"setting": f"{selector}->{trainer}", "selector": selector, "trainer": trainer}


def stage_base_eval(ctx: StageContext) -> None:
    """The floor rows: every trained model before fine-tuning."""
    cfg = ctx.cfg
    jobs = [(slug(t), lambda t=t: load_model(t, ctx)) for t in trainers(cfg)]
    by_slug = run_eval_jobs(ctx, jobs)
    results = {t: by_slug[slug(t)] for t in trainers(cfg)}
    for sel, trainer in cfg.pairs():
        log_eval(ctx, results[trainer], "base", {**pair_params(sel, trainer), "budget": 0, "seed": -1})
    ctx.save_json("scores.json", results)


# ---------------------------------------------------------------------------------------------- LESS
def stage_less_warmup(ctx: StageContext) -> None:
    """LESS step 1: LoRA warm-up of each selector on a random warmup_fraction of the pool, with an
    Adam-state snapshot at every epoch end (the checkpoints whose gradients become features)."""
    from common.sft import finetune

    cfg = ctx.cfg
    if "less" not in cfg.methods:
        ctx.save_json("warmup.json", {"skipped": "less not in methods"})
        return
    pool, _ = load_pool(ctx)
    k = budget_size(cfg.less.warmup_fraction, len(pool))
    subset = random.Random(cfg.seed).sample(range(len(pool)), k)
    examples = [pool[i] for i in sorted(subset)]
    info = {}
    for sel in selectors(cfg):
        model, tok = load_model(sel, ctx)
        sft = sft_config(cfg, cfg.seed, len(examples), ctx.world_size, epochs=float(cfg.less.warmup_epochs),
                         snapshot_epochs=True,
                         snapshot_optimizer=True, max_len=cfg.less.max_len, lr_schedule="linear")
        res = finetune(model, tok, examples, sft, ctx.out_dir / slug(sel))
        info[sel] = {"steps": res.step, "final_loss": res.final_loss, "examples": len(examples)}
        ctx.log(table="distill_less", method="warmup", metric="final_loss", value=res.final_loss, n=len(examples),
                params={"selector": sel})
    ctx.save_json("warmup.json", info)


def _batches(tok: Any, examples: list[dict], sft: Any, size: int):
    from common.sft import encode_examples, make_collator

    enc = encode_examples(tok, examples, sft)
    collate = make_collator(tok)
    for i in range(0, len(enc), size):
        yield collate(enc[i:i + size])


def stage_less_features(ctx: StageContext) -> None:
    """LESS step 2: per warm-up checkpoint, Adam-preconditioned projected gradients of every pool example and
    SGD gradients of every validation example (per subtask), LoRA parameters only."""
    from common.sft import apply_lora, load_trainable
    from common.train import list_snapshots, load_snapshot_optimizer, snapshot_info
    from exp_distill_data import less

    cfg = ctx.cfg
    if "less" not in cfg.methods:
        ctx.save_json("features.json", {"skipped": "less not in methods"})
        return
    pool, val = load_pool(ctx)
    proj = less.RandomProjector(cfg.less.proj_dim, seed=cfg.seed)
    meta: dict[str, list] = {}
    for sel in selectors(cfg):
        warm = ctx.input("less_warmup") / slug(sel)
        model, tok = load_model(sel, ctx, eager=True)
        sft = sft_config(cfg, cfg.seed, max_len=cfg.less.max_len)
        model = apply_lora(model, sft.r, sft.alpha, sft.dropout, seed=cfg.seed)
        meta[sel] = []
        for step, path in list_snapshots(warm):
            if step == 0:  # the checkpoints are the epoch ends (LESS), not the initial adapter
                continue
            # LESS weighs a checkpoint by the mean learning rate of its epoch (the snapshot's mean_lr)
            epoch_lr = snapshot_info(warm, step)["mean_lr"]
            load_trainable(model, path)
            # snapshots hold Adam's moments by parameter name; common.train's AdamW uses torch's betas/eps
            state = less.adam_state_from_state_dict({"state": load_snapshot_optimizer(warm, step),
                                                     "param_groups": [{}]}, model)
            out = ctx.out_dir / slug(sel) / f"step_{step:06d}"
            # one shard per batch, written atomically: a killed stage resumes at its first missing shard
            # every process computes every world_size-th shard
            part = {"rank": ctx.rank, "world_size": ctx.world_size}
            less.write_feature_shards(model, _batches(tok, pool, sft, cfg.less.batch_size), out / "train",
                                      kind="adam", optimizer_state=state, projector=proj, **part)
            for sub, examples in val.items():
                less.write_feature_shards(model, _batches(tok, examples, sft, cfg.less.batch_size),
                                          out / f"val_{slug(sub)}", kind="sgd", projector=proj, **part)
            meta[sel].append({"step": step, "lr": epoch_lr, "dir": out.name})
            print(f"[{EXP}] less_features {sel} step {step}: {len(pool)} train, {len(val)} subtasks")
    ctx.save_json("features.json", meta)


def stage_less_select(ctx: StageContext) -> None:
    """LESS step 3: score = sum over checkpoints (weighted by their learning rate) of the mean cosine to a
    subtask's validation features, max over subtasks; top-k per budget."""
    from exp_distill_data import less

    cfg = ctx.cfg
    pool, val = load_pool(ctx)
    feats = ctx.load_json("less_features", "features.json")
    selection: dict[str, dict[str, list[int]]] = {}
    if "less" in cfg.methods:
        for sel in selectors(cfg):
            ckpts = feats[sel]
            if not sum(c["lr"] for c in ckpts) > 0:
                raise ValueError(f"less_warmup of {sel}: every warm-up update had learning rate 0 ({len(ckpts)} "
                                 "checkpoint(s)); give the warm-up more steps (less.warmup_fraction, "
                                 "less.warmup_epochs, finetune.batch_size) or less warm-up (finetune.warmup_ratio)")
            folder = ctx.input("less_features") / slug(sel)
            train = [less.read_feature_shards(folder / c["dir"] / "train") for c in ckpts]
            vals = [{s: less.read_feature_shards(folder / c["dir"] / f"val_{slug(s)}") for s in val} for c in ckpts]
            scores = less.less_scores(train, vals, [c["lr"] for c in ckpts])
            if ctx.is_main:
                torch.save(scores, ctx.path(f"{slug(sel)}_scores.pt"))
            selection[sel] = {str(budget_size(b, len(pool))): less.select_top_k(scores, budget_size(b, len(pool)))
                              .tolist() for b in cfg.budgets}
    ctx.save_json("selection.json", selection)


# -------------------------------------------------------------------------------------- train / evaluate
def planned_runs(cfg: Config, pool_size: int) -> list[dict]:
    """Every fine-tune: (trainer, method, budget, seed[, selector]); full and random do not depend on the
    selector, so settings that share a trainer share those runs."""
    runs: dict[str, dict] = {}
    for sel, trainer in cfg.pairs():
        for method in cfg.methods:
            budgets = [pool_size] if method == "full" else [budget_size(b, pool_size) for b in cfg.budgets]
            seeds = cfg.seeds[:cfg.full_seeds] if method == "full" and cfg.full_seeds else cfg.seeds
            for k in budgets:
                for seed in seeds:
                    r = {"trainer": trainer, "method": method, "budget": k, "seed": seed,
                         "selector": sel if method == "less" else ""}
                    name = slug(f"{trainer}-{method}-{k}-s{seed}" + (f"-by-{sel}" if r["selector"] else ""))
                    runs.setdefault(name, {**r, "name": name, "settings": []})["settings"].append([sel, trainer])
    return list(runs.values())


def subset_for(run: dict, pool: list[dict], selection: dict) -> list[dict]:
    if run["method"] == "full":
        return pool
    if run["method"] == "random":  # the subset seed is the run's seed: same subsets for every trainer
        return [pool[i] for i in random_subset(len(pool), run["budget"], run["seed"])]
    return [pool[i] for i in selection[run["selector"]][str(run["budget"])]]


def stage_train(ctx: StageContext) -> None:
    """Fine-tune each trainer on each method's subset (LoRA); each run resumes from its own checkpoint,
    a finished run (adapter saved) is skipped."""
    from common.results import atomic_write_text
    from common.sft import finetune, save_trainable

    cfg = ctx.cfg
    pool, _ = load_pool(ctx)
    selection = ctx.load_json("less_select", "selection.json")
    runs = planned_runs(cfg, len(pool))
    for i, r in enumerate(runs, 1):
        folder = ctx.out_dir / r["name"]
        if not (folder / "adapter.safetensors").is_file():  # the adapter, written last, marks a finished run
            examples = subset_for(r, pool, selection)
            print(f"[{EXP}] train {i}/{len(runs)} {r['name']}: {len(examples)} examples", flush=True)
            model, tok = load_model(r["trainer"], ctx)
            t0 = time.perf_counter()
            res = finetune(model, tok, examples, sft_config(cfg, r["seed"], len(examples), ctx.world_size),
                           folder / "train")
            if ctx.is_main:  # seconds: of the attempt that finished (a resumed run's are since its resume)
                atomic_write_text(folder / "train.json", json.dumps(
                    {"steps": res.step, "final_loss": res.final_loss, "examples": len(examples),
                     "seconds": time.perf_counter() - t0, "resumed": res.resumed_from is not None}))
                save_trainable(res.model, folder / "adapter.safetensors")   # atomic
            ctx.barrier()  # the adapter exists for every process before the next run's check
        info = json.loads((folder / "train.json").read_text(encoding="utf-8"))
        p = {"trainer": r["trainer"], "budget": r["budget"], "seed": r["seed"], "selector": r["selector"]}
        ctx.log(table="distill_train", method=r["method"], metric="final_loss", value=info["final_loss"],
                n=info["examples"], params=p)
        _log_run_time(ctx, info, r["method"], p, "train")
    ctx.save_json("runs.json", runs)


def stage_evaluate(ctx: StageContext) -> None:
    """Evaluate every fine-tuned adapter (unmerged LoRA) on the same fixed question subsets as the base."""
    cfg = ctx.cfg
    runs = ctx.load_json("train", "runs.json")
    pool, _ = load_pool(ctx)

    def load(r: dict):
        from common.sft import apply_lora, load_trainable

        model, tok = load_model(r["trainer"], ctx)
        sft = sft_config(cfg, r["seed"])
        if sft.method == "lora":
            model = apply_lora(model, sft.r, sft.alpha, sft.dropout)
        load_trainable(model, ctx.input("train") / r["name"] / "adapter.safetensors")
        return model, tok

    all_scores = run_eval_jobs(ctx, [(r["name"], lambda r=r: load(r)) for r in runs])
    for r in runs:
        for sel, trainer in r["settings"]:
            log_eval(ctx, all_scores[r["name"]], r["method"], {**pair_params(sel, trainer), "budget": r["budget"],
                                                               "budget_frac": r["budget"] / len(pool),
                                                               "seed": r["seed"]})
    ctx.save_json("scores.json", all_scores)


# ------------------------------------------------------------------------- part 2: trajectory matching
def random_subset(pool_size: int, k: int, seed: int) -> list[int]:
    """The random baseline's subset of a seed (also where that seed's synthetic set starts: ours - random,
    paired by seed, is what distillation adds to its own initial data)."""
    return sorted(random.Random(1000 + seed).sample(range(pool_size), k))


def expert_sft(cfg: Config, seed: int, n_examples: int, world_size: int = 1):
    """An expert run: the distiller's LoRA shape (finetune.r / alpha), MTT's optimiser and snapshots."""
    e = cfg.distill.experts
    if e.batch_size % world_size:
        raise ValueError(f"distill.experts.batch_size {e.batch_size} does not split over {world_size} processes")
    batch = min(e.batch_size, max(world_size, n_examples - n_examples % world_size)) // world_size
    return sft_config(cfg, seed, world_size=world_size, batch_size=batch, dropout=0.0, optimizer=e.optimizer,
                      lr=e.lr, momentum=e.momentum, lr_schedule="constant", warmup_ratio=0.0,
                      max_grad_norm=e.max_grad_norm, epochs=e.epochs, snapshot_every=e.snapshot_every,
                      max_len=e.max_len)


def distillers(cfg: Config) -> list[str]:
    return list(cfg.distill.distillers) or selectors(cfg)


def expert_dirs(ctx: StageContext, distiller: str) -> list[Path]:
    return [ctx.input("experts") / slug(distiller) / f"expert_{k}" for k in range(ctx.cfg.distill.experts.runs)]


def stage_experts(ctx: StageContext) -> None:
    """K LoRA fine-tunes of each distiller on the full pool (SGD, constant rate), trainable parameters
    snapshotted every s steps: the trajectories that distillation matches. Each run resumes."""
    from common.results import atomic_write_text
    from common.sft import finetune
    from common.train import list_snapshots

    cfg = ctx.cfg
    pool, _ = load_pool(ctx)
    info: dict[str, list] = {}
    for d in distillers(cfg):
        info[d] = []
        for k in range(cfg.distill.experts.runs):
            folder = ctx.out_dir / slug(d) / f"expert_{k}"
            done = folder / "expert.json"
            if not done.is_file():
                print(f"[{EXP}] expert {k + 1}/{cfg.distill.experts.runs} of {d}: {len(pool)} examples", flush=True)
                model, tok = load_model(d, ctx)
                res = finetune(model, tok, pool, expert_sft(cfg, cfg.seed + k, len(pool), ctx.world_size), folder)
                if ctx.is_main:
                    atomic_write_text(done, json.dumps({"steps": res.step, "final_loss": res.final_loss,
                                                        "snapshots": len(list_snapshots(folder))}))
                ctx.barrier()
            rec = json.loads(done.read_text(encoding="utf-8"))
            info[d].append(rec)
            for metric in ("final_loss", "snapshots", "steps"):
                ctx.log(table="distill_experts", method="expert", metric=metric, value=rec[metric], n=len(pool),
                        params={"distiller": d, "expert": k})
    ctx.save_json("experts.json", info)


def distill_jobs(cfg: Config, pool_size: int) -> list[dict]:
    """Every synthetic set: distiller x variant x budget x seed, then the ablations (first distiller,
    first budget, first seed)."""
    jobs = []
    for d in distillers(cfg):
        for variant in cfg.distill.variants:
            for b in cfg.budgets:
                k = budget_size(b, pool_size)
                for seed in cfg.seeds:
                    over = {"reg": "none"} if variant == "ours_noreg" else {}
                    jobs.append({"distiller": d, "method": variant, "budget": k, "seed": seed, "overrides": over,
                                 "ablation": ""})
    if cfg.distill.ablations:
        d, k, seed = distillers(cfg)[0], budget_size(cfg.budgets[0], pool_size), cfg.seeds[0]
        for spec in cfg.distill.ablations:
            jobs.append({"distiller": d, "method": f"ours[{spec}]", "budget": k, "seed": seed,
                         "overrides": parse_ablation(spec), "ablation": spec})
    for j in jobs:
        j["name"] = slug(f"{j['distiller']}-{j['method']}-{j['budget']}-s{j['seed']}")
    return jobs


def match_config(cfg: Config, job: dict):
    return dataclasses.replace(cfg.distill.match, seed=job["seed"], **job["overrides"])


def distiller_model(d: str, ctx: StageContext):
    """The distiller with the experts' (dropout-free) LoRA structure. Eager attention is forced: torch's fused
    SDPA kernels have no double backward (pytorch/pytorch#116350) and the outer gradient needs one."""
    from common.sft import apply_lora

    model, tok = load_model(d, ctx, eager=True)
    f = ctx.cfg.finetune
    return apply_lora(model, f.r, f.alpha, 0.0, seed=ctx.cfg.seed), tok


def synthetic_examples(pool: list[dict], job: dict) -> list[dict]:
    return [pool[i] for i in random_subset(len(pool), job["budget"], job["seed"])]


def _window_mean(history: list[dict]) -> float:
    """Mean matching loss over some outer iterations (NaN for none)."""
    return sum(r["matching"] for r in history) / len(history) if history else float("nan")


def _log_run_time(ctx: StageContext, info: dict, method: str, params: dict, stage: str) -> None:
    """One fine-tune's wall seconds (rows distill_run_time, the cost table); not for a resumed run, whose
    seconds cover only the attempt that finished."""
    if "seconds" in info and not info.get("resumed"):
        ctx.log(table="distill_run_time", method=method, metric="seconds", value=info["seconds"],
                n=info["examples"], params={**params, "stage": stage})


def stage_distill(ctx: StageContext) -> None:
    """Trajectory matching (exp_distill_data.distill) for every job, shared out over the processes; each
    job resumes from its own state file and ends with ``<job>/synthetic.pt``."""
    from exp_distill_data.distill import build_synthetic, distill, load_trajectories, write_history

    cfg = ctx.cfg
    pool, _ = load_pool(ctx)
    jobs = distill_jobs(cfg, len(pool))
    mine = ctx.shard(jobs)
    for i, job in enumerate(mine, 1):
        folder = ctx.out_dir / job["name"]
        if (folder / "synthetic.pt").is_file():
            continue
        mcfg = match_config(cfg, job)
        print(f"[{EXP}] distill {i}/{len(mine)} {job['name']}: N={mcfg.syn_steps} M={mcfg.expert_span} "
              f"reg={mcfg.reg} x {mcfg.iterations} iterations", flush=True)
        peak_known = reset_peak_rss()   # this job's own high-water mark, not the process's so far
        model, tok = distiller_model(job["distiller"], ctx)
        E = model.get_input_embeddings().weight
        sft = sft_config(cfg, job["seed"], max_len=cfg.distill.experts.max_len)
        syn = build_synthetic(tok, E, synthetic_examples(pool, job), sft, init=mcfg.init, seed=job["seed"])
        traj = load_trajectories(expert_dirs(ctx, job["distiller"]), lr=cfg.distill.experts.lr)
        t0 = time.process_time()

        def progress(it: int, rec: dict, n: int = mcfg.iterations, every: int = mcfg.save_every,
                     name: str = job["name"]) -> None:
            if it % every == 0 or it == n:
                print(f"[{EXP}]   {name} {it}/{n}: matching {rec.get('matching', float('nan')):.4f} "
                      f"reg {rec.get('reg', float('nan')):.4g} lr {rec.get('lr', float('nan')):.4g}", flush=True)

        state = distill(model, syn, traj, mcfg, folder / "work", progress=progress)
        write_history(folder / "history.json", state, mcfg)
        out = {**syn.tensors(), "init_embeds": syn.embeds, "embeds": state.embeds.detach().cpu()}
        meta = {"lr": state.lr, "seconds": sum(r["seconds"] for r in state.history),
                "cpu_seconds_this_process": time.process_time() - t0,
                "peak_rss_mib": peak_rss_mib() if peak_known else float("nan"),
                "examples": random_subset(len(pool), job["budget"], job["seed"])}
        from common.results import atomic_write_text

        atomic_write_text(folder / "meta.json", json.dumps(meta, sort_keys=True))
        tmp = folder / f".tmp-{os.getpid()}-synthetic.pt"
        torch.save(out, tmp)
        os.replace(tmp, folder / "synthetic.pt")   # last: marks a finished job
        del model
    ctx.barrier()
    for job in jobs:
        folder = ctx.out_dir / job["name"]
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        hist = json.loads((folder / "history.json").read_text(encoding="utf-8"))["history"]
        done = [r for r in hist if "matching" in r]
        p = {"distiller": job["distiller"], "budget": job["budget"], "seed": job["seed"], "ablation": job["ablation"]}
        # a single start is one random draw: the first/last ten iterations' means compare like with like
        for metric, value in [("inner_lr", meta["lr"]), ("seconds", meta["seconds"]),
                              ("matching_first", done[0]["matching"] if done else float("nan")),
                              ("matching_first10_mean", _window_mean(done[:10])),
                              ("matching_last", done[-1]["matching"] if done else float("nan")),
                              ("matching_last10_mean", _window_mean(done[-10:])),
                              ("skipped_starts", sum(1 for r in hist if r.get("skipped")))]:
            ctx.log(table="distill_match", method=job["method"], metric=metric, value=float(value), params=p)
        ctx.log(table="distill_run_time", method=job["method"], metric="seconds", value=meta["seconds"],
                params={**p, "stage": "distill"})
        if math.isfinite(meta.get("peak_rss_mib", float("nan"))):
            ctx.log(table="distill_run_time", method=job["method"], metric="peak_rss_mib",
                    value=meta["peak_rss_mib"], params={**p, "stage": "distill"})
    ctx.save_json("jobs.json", jobs)


def stage_project(ctx: StageContext) -> None:
    """Nearest-token ids at every learnable position -> text with the distiller's tokenizer; distances before
    and after distillation, positions whose nearest token changed, whether the text re-tokenises to the same
    ids; ``<job>/examples.jsonl`` (the distilled data) and ``inspection.md`` (read what the method produced)."""
    from exp_distill_data.project import inspection_markdown, project_synthetic

    cfg = ctx.cfg
    pool, _ = load_pool(ctx)
    jobs = ctx.load_json("distill", "jobs.json")
    sections = []
    for d in distillers(cfg):
        model, tok = load_model(d, ctx)
        E = model.get_input_embeddings().weight.detach()
        for job in (j for j in jobs if j["distiller"] == d):
            syn = torch.load(ctx.input("distill") / job["name"] / "synthetic.pt", weights_only=True)
            res = project_synthetic(syn, E, tok, synthetic_examples(pool, job), metric=match_config(cfg, job).metric)
            if ctx.is_main:
                (ctx.out_dir / job["name"]).mkdir(parents=True, exist_ok=True)
                write_jsonl(ctx.path(f"{job['name']}/examples.jsonl"), res["examples"])
            ctx.save_json(f"{job['name']}/stats.json", res["stats"])
            p = {"distiller": d, "budget": job["budget"], "seed": job["seed"], "ablation": job["ablation"]}
            for metric, value in res["stats"].items():
                ctx.log(table="distill_projection", method=job["method"], metric=metric, value=float(value), params=p)
            sections.append((job, res))
        del model
    if ctx.is_main:
        from common.results import atomic_write_text

        atomic_write_text(ctx.path("inspection.md"), inspection_markdown(sections))


def student_runs(cfg: Config, pool_size: int) -> list[dict]:
    """Fine-tunes on the distilled sets: the text on each trainer of the distiller's settings (and on the
    distiller itself, X -> X), the continuous embeddings on the distiller (``<variant>_emb``). Ablation sets
    train the settings' trainers only."""
    runs = []
    for job in distill_jobs(cfg, pool_size):
        d = job["distiller"]
        text_to = {t for s, t in cfg.pairs() if s == d}
        if cfg.distill.source_student and not job["ablation"]:
            text_to.add(d)
        kinds = [("text", t, job["method"]) for t in sorted(text_to)]
        if cfg.distill.embedding_student and not job["ablation"]:
            kinds.append(("emb", d, f"{job['method']}_emb"))
        for kind, trainer, method in kinds:
            name = slug(f"{trainer}-{kind}-{job['name']}")
            runs.append({"name": name, "kind": kind, "trainer": trainer, "method": method, "budget": job["budget"],
                         "seed": job["seed"], "set": job["name"], "selector": d, "settings": [[d, trainer]],
                         "ablation": job["ablation"]})
    return runs


def _train_on_embeddings(ctx: StageContext, run: dict, folder: Path):
    """The embedding-level student: a fresh LoRA on the distiller trained on the continuous synthetic inputs
    (no projection), with the same fine-tuning recipe as every other student."""
    from common.sft import prepare_model
    from common.train import train
    from exp_distill_data.distill import SyntheticSet, student_inputs

    model, _ = load_model(run["trainer"], ctx)
    syn = torch.load(ctx.input("distill") / run["set"] / "synthetic.pt", weights_only=True)
    s = SyntheticSet.from_tensors(syn)
    E = model.get_input_embeddings().weight
    inputs = student_inputs(s, syn["embeds"].to(E.device), E)
    rows = [{k: v[i].detach().cpu() for k, v in inputs.items()} for i in range(len(s))]
    sft = sft_config(ctx.cfg, run["seed"], len(rows), ctx.world_size)
    model = prepare_model(model, sft)
    return train(model, rows, sft.train_config(), folder / "train",
                 collate_fn=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]})


def stage_students(ctx: StageContext) -> None:
    """Fine-tune every student (``student_runs``); each run resumes, a finished one (adapter saved) is skipped."""
    from common.results import atomic_write_text
    from common.sft import finetune, save_trainable

    cfg = ctx.cfg
    pool, _ = load_pool(ctx)
    runs = student_runs(cfg, len(pool))
    for i, r in enumerate(runs, 1):
        folder = ctx.out_dir / r["name"]
        if not (folder / "adapter.safetensors").is_file():
            print(f"[{EXP}] students {i}/{len(runs)} {r['name']}", flush=True)
            t0 = time.perf_counter()
            if r["kind"] == "emb":
                res, n = _train_on_embeddings(ctx, r, folder), r["budget"]
            else:
                examples = read_jsonl(ctx.input("project") / r["set"] / "examples.jsonl")
                model, tok = load_model(r["trainer"], ctx)
                res = finetune(model, tok, examples, sft_config(cfg, r["seed"], len(examples), ctx.world_size),
                               folder / "train")
                n = len(examples)
            if ctx.is_main:
                atomic_write_text(folder / "train.json", json.dumps(
                    {"steps": res.step, "final_loss": res.final_loss, "examples": n,
                     "seconds": time.perf_counter() - t0, "resumed": res.resumed_from is not None}))
                save_trainable(res.model, folder / "adapter.safetensors")
            ctx.barrier()
        info = json.loads((folder / "train.json").read_text(encoding="utf-8"))
        p = {"trainer": r["trainer"], "budget": r["budget"], "seed": r["seed"], "selector": r["selector"],
             "ablation": r["ablation"]}
        ctx.log(table="distill_train", method=r["method"], metric="final_loss", value=info["final_loss"],
                n=info["examples"], params=p)
        _log_run_time(ctx, info, r["method"], p, "students")
    ctx.save_json("runs.json", runs)


def stage_students_eval(ctx: StageContext) -> None:
    """Evaluate every student on the same questions as the baselines, and the base model of any distiller
    that is not a settings' trainer (the floor of its X -> X rows)."""
    cfg = ctx.cfg
    runs = ctx.load_json("students", "runs.json")
    pool, _ = load_pool(ctx)

    def load(r: dict):
        from common.sft import apply_lora, load_trainable

        model, tok = load_model(r["trainer"], ctx)
        sft = sft_config(cfg, r["seed"])
        if sft.method == "lora":
            model = apply_lora(model, sft.r, sft.alpha, sft.dropout)
        load_trainable(model, ctx.input("students") / r["name"] / "adapter.safetensors")
        return model, tok

    extra_base = sorted({r["trainer"] for r in runs} - set(trainers(cfg)))
    jobs = [(f"base-{slug(t)}", lambda t=t: load_model(t, ctx)) for t in extra_base]
    jobs += [(r["name"], lambda r=r: load(r)) for r in runs]
    scores = run_eval_jobs(ctx, jobs)
    for t in extra_base:
        log_eval(ctx, scores[f"base-{slug(t)}"], "base", {**pair_params(t, t), "budget": 0, "seed": -1})
    for r in runs:
        log_eval(ctx, scores[r["name"]], r["method"], {**pair_params(r["selector"], r["trainer"]),
                                                      "budget": r["budget"], "budget_frac": r["budget"] / len(pool),
                                                      "seed": r["seed"], "ablation": r["ablation"]})
    ctx.save_json("scores.json", {r["name"]: scores[r["name"]] for r in runs})
    ctx.save_json("base_scores.json", {t: scores[f"base-{slug(t)}"] for t in extra_base})


# -------------------------------------------------------------------------------------------- table
def stage_table(ctx: StageContext) -> None:
    """Mean ± std over seeds with 95 % t-intervals, and paired differences (by seed: LESS - random,
    ours - random, ours - LESS, ours - ours_noreg, ...; full - base), as rows of table distill_summary."""
    from exp_distill_data.table import summary_rows

    base = ctx.load_json("base_eval", "scores.json")
    runs = ctx.load_json("train", "runs.json")
    scores = ctx.load_json("evaluate", "scores.json")
    if ctx.has_input("students_eval"):  # part 2's rows, when its stages ran
        base = {**base, **ctx.load_json("students_eval", "base_scores.json")}
        runs = runs + ctx.load_json("students", "runs.json")
        scores = {**scores, **ctx.load_json("students_eval", "scores.json")}
    rows = summary_rows(ctx.cfg, base, runs, scores)
    for row in rows:
        ctx.log(**row)
    ctx.save_json("summary.json", rows)


STAGES = [
    Stage("data", stage_data, config_keys=("seed", "data")),
    Stage("source", stage_source, config_keys=("source", "settings"), resumable=True),
    Stage("base_eval", stage_base_eval, config_keys=("settings", "eval"), inputs=("source",)),
    Stage("less_warmup", stage_less_warmup, config_keys=("seed", "settings", "methods", "finetune", "less"),
          inputs=("data", "source"), resumable=True, version="2"),  # 2: snapshots record mean_lr
    Stage("less_features", stage_less_features, config_keys=("seed", "less"),
          inputs=("data", "source", "less_warmup"), version="3",  # 3: epoch-mean rates, shards
          resumable=True),
    Stage("less_select", stage_less_select, config_keys=("budgets",), inputs=("data", "less_features")),
    Stage("train", stage_train, config_keys=("seeds", "full_seeds", "methods", "budgets", "finetune"),
          inputs=("data", "source", "less_select"), resumable=True),
    Stage("evaluate", stage_evaluate, config_keys=("eval",), inputs=("data", "source", "train"), resumable=True),
    Stage("experts", stage_experts, inputs=("data", "source"), resumable=True,
          config_keys=("seed", "settings", "finetune", "distill.distillers", "distill.experts")),
    Stage("distill", stage_distill, config_keys=("seeds", "budgets", "finetune", "distill"),
          inputs=("data", "source", "experts"), resumable=True),
    Stage("project", stage_project, config_keys=("distill",), inputs=("data", "source", "distill")),
    Stage("students", stage_students, config_keys=("finetune", "distill"), inputs=("data", "source", "distill",
                                                                                  "project"), resumable=True),
    Stage("students_eval", stage_students_eval, config_keys=("eval",), inputs=("data", "source", "students"),
          resumable=True),
    Stage("table", stage_table, inputs=("base_eval", "train", "evaluate"),
          optional_inputs=("students", "students_eval"), cache=False),
]


def setup(cfg: Config) -> None:
    torch.set_num_threads(cfg.threads)


def main(argv: list[str] | None = None) -> int:
    return run_experiment(EXP, Config, STAGES, argv=argv, doc=__doc__, setup=setup)


if __name__ == "__main__":
    raise SystemExit(main())
