"""Stages of the curriculum training study (part 2), LESS-style: each reads its inputs from disk.

    study_data       tokenizer (EN + FR BPE), fixed-length sequences, held-out validation sets, per-sequence
                     metrics                                   <- metrics, dedup (part 1)
    study_reference  a small reference LM on the reserved sequences; ref_nll of every sequence
    study_select     the selection arms' candidates: ASK-LLM P(yes) (raw and normalised), MiniLM embeddings
                     -> Density and D4 ranks                   (skipped, with a marker, without select arms)
    study_train      every (schedule, arm, seed) run; resumable: each run checkpoints in its own folder
    study_table      curves, convergence metrics and paired differences -> results rows
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common.stages import Stage, StageContext, StageInputError
from exp_curriculum import arms as arms_mod
from exp_curriculum import convergence as conv
from exp_curriculum import study as st
from exp_curriculum.study_data import build_sequences, save_arrays, score_sequences

TABLE_CURVES = "curriculum_curves"
TABLE_CONV = "curriculum_convergence"
TABLE_DIFF = "curriculum_speedup"
TABLE_DATA = "curriculum_study_data"


def _read_parquet(path: Path, stage: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise StageInputError(f"cannot read {path.name} of stage '{stage}': {exc}. Rerun --stage {stage} --force") \
            from None


def _load_data(ctx: StageContext) -> dict:
    folder = ctx.input("study_data")
    info = json.loads((folder / "study_data.json").read_text(encoding="utf-8"))
    table = _read_parquet(folder / "sequences.parquet", "study_data")
    if ctx.has_input("study_reference"):
        ref = _read_parquet(ctx.input("study_reference") / "ref_nll.parquet", "study_reference")
        table["ref_nll"] = ref["ref_nll"].to_numpy()
    return {"folder": folder, "info": info, "table": table,
            "sequences": np.load(folder / "sequences.npy", mmap_mode="r"),
            "val": {lg: np.load(folder / f"val_{lg}.npy") for lg in info["languages"]}}


def _tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"))


# ---------------------------------------------------------------------------------------- stages
def stage_study_data(ctx: StageContext) -> None:
    import torch

    from common.models import train_bpe_tokenizer

    t0 = time.perf_counter()
    cfg, s = ctx.cfg, ctx.cfg.study
    torch.set_num_threads(cfg.threads)
    docs = pd.read_parquet(ctx.input("metrics") / "metrics.parquet", columns=["id", "text", "language", "source",
                                                                               "genre"])
    dedup = pd.read_parquet(ctx.input("dedup") / "dedup.parquet", columns=["id", "minhash_keep"])
    if s.data.dedup:
        docs = docs[dedup["minhash_keep"].to_numpy().astype(bool)]
    docs = docs[docs["language"].isin(s.data.languages)].reset_index(drop=True)
    # the tokenizer learns from training-side text only: a seeded sample, validation documents excluded below
    rng = np.random.default_rng([cfg.seed, 3])
    sample = np.concatenate([rng.permutation(np.flatnonzero(docs["language"] == lg))[: s.data.tokenizer_docs]
                             for lg in s.data.languages])
    tok = train_bpe_tokenizer(docs["text"].iloc[np.sort(sample)].tolist(), vocab_size=s.data.vocab_size,
                              save_dir=ctx.path("tokenizer"))
    built = build_sequences(docs, tok, s.data, cfg.seed)
    table = built["table"]
    texts = tok.batch_decode(built["sequences"].tolist())
    print(f"study_data: {len(table)} sequences of {s.data.seq_len} tokens; scoring their text")
    scores = score_sequences(texts, table["language"].tolist(), cfg.num_proc)
    table = pd.concat([table, scores], axis=1)
    built["table"] = table
    save_arrays(ctx.out_dir, built)
    info = {"languages": s.data.languages, "vocab_size": len(tok), "seq_len": s.data.seq_len,
            "n_sequences": len(table), "seconds": time.perf_counter() - t0}
    ctx.save_json("study_data.json", info)
    for (lang, role), g in table.groupby(["language", "role"]):
        ctx.log(table=TABLE_DATA, method=role, metric="sequences", value=len(g), params={"language": lang})
    for lang, v in built["val"].items():
        ctx.log(table=TABLE_DATA, method="validation", metric="sequences", value=len(v), params={"language": lang})
    print(f"study_data: done in {info['seconds']:.0f} s")


def stage_study_reference(ctx: StageContext) -> None:
    """The reference LM of the 'perplexity' difficulty: the study's model trained on the reserved sequences
    (never in any pool), then the mean token NLL of every sequence under it."""
    import torch

    from common.train import TrainConfig, train

    t0 = time.perf_counter()
    cfg, s = ctx.cfg, ctx.cfg.study
    torch.set_num_threads(cfg.threads)
    data = _load_data(ctx)
    table, seqs = data["table"], data["sequences"]
    ref_rows = np.flatnonzero(table["role"].to_numpy() == "reference")
    if len(ref_rows) < s.train.global_batch:
        raise StageInputError(f"study_reference: {len(ref_rows)} reserved sequences, fewer than one batch "
                              "(study.data.reference_sequences)")
    model = st.build_model(s.model, data["info"]["vocab_size"], s.data.seq_len, cfg.seed + 1000)
    tcfg = TrainConfig(epochs=s.reference.epochs, batch_size=s.train.global_batch, lr=s.reference.lr,
                       warmup_steps=s.train.warmup_steps, lr_schedule="cosine", seed=cfg.seed + 1000,
                       checkpoint_every=s.train.checkpoint_every, keep_checkpoints=1, log_with="none")
    res = train(model, st.SequenceDataset(seqs[ref_rows]), tcfg, out_dir=ctx.path("train"))
    nll = sequence_nll(res.model, seqs, s.train.eval_batch_size)
    pd.DataFrame({"ref_nll": nll}).to_parquet(ctx.path("ref_nll.parquet"))
    ctx.save_json("study_reference.json", {"steps": res.step, "final_train_loss": res.final_loss,
                                           "seconds": time.perf_counter() - t0})
    ctx.log(table=TABLE_DATA, method="reference_lm", metric="final_train_loss", value=res.final_loss,
            n=len(ref_rows), params={"steps": res.step})
    print(f"study_reference: {res.step} steps, NLL of {len(nll)} sequences in {time.perf_counter() - t0:.0f} s")


def sequence_nll(model, sequences: np.ndarray, batch_size: int) -> np.ndarray:
    """Mean next-token NLL (nats) of each sequence."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    out = np.empty(len(sequences))
    with torch.no_grad():
        for i in tqdm(range(0, len(sequences), batch_size), desc="reference NLL", leave=False):
            x = torch.from_numpy(np.asarray(sequences[i:i + batch_size]).astype(np.int64))
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
            out[i:i + len(x)] = nll.mean(1).numpy()
    return out


def _needs_select(cfg) -> bool:
    return any(a.kind == "select" and a.selection != "random" for a in cfg.study.parsed_arms())


def stage_study_select(ctx: StageContext) -> None:
    """Scores of the selection candidates (seed-independent): ASK-LLM with the offline SmolLM2 (P(yes) and
    the normalised P(yes) / (P(yes) + P(no))), MiniLM embeddings -> Gaussian-kernel density and D4's order."""
    import torch

    t0 = time.perf_counter()
    cfg, s = ctx.cfg, ctx.cfg.study
    if not _needs_select(cfg):
        ctx.save_json("study_select.json", {"enabled": False})
        print("study_select: no selection arm with a model score; skipped")
        return
    torch.set_num_threads(cfg.threads)
    data = _load_data(ctx)
    table = data["table"]
    cands = arms_mod.selection_candidates(table, s.budget_sequences, s.en_fraction, s.select.factor)
    tok = _tokenizer(data["folder"])
    texts = tok.batch_decode(np.asarray(data["sequences"][cands]).tolist())
    out = pd.DataFrame({"row": cands})
    wanted = {a.selection for a in s.parsed_arms() if a.kind == "select"}
    if wanted & {"askllm", "askllm_norm"}:
        from common.models import load_causal_lm
        from exp_curriculum.quality import askllm_probs, normalised_yes

        model, mtok = load_causal_lm(s.select.askllm_model)
        print(f"study_select: ASK-LLM on {len(texts)} candidates")
        p_yes, p_no = askllm_probs(model, mtok, texts, s.select.askllm_batch, s.select.askllm_max_tokens)
        out["askllm"], out["askllm_norm"] = p_yes, normalised_yes(p_yes, p_no)
        del model
    if wanted & {"d4", "density"}:
        from common.models import encode_texts, load_encoder
        from exp_curriculum.quality import kernel_density

        enc, etok = load_encoder("all-minilm-l6-v2")
        emb = encode_texts(enc, etok, texts, max_length=s.select.encoder_max_tokens).numpy()
        out["density"] = kernel_density(emb, s.select.bandwidth)
        out["d4_rank"] = np.empty(len(cands))
        for lg in s.data.languages:  # D4 within each language, as the quotas are per language
            m = table["language"].to_numpy()[cands] == lg
            out.loc[m, "d4_rank"] = d4_rank(emb[m], s.select.n_clusters, s.select.eps, cfg.seed)
    out.to_parquet(ctx.path("select_scores.parquet"))
    ctx.save_json("study_select.json", {"enabled": True, "n_candidates": len(cands),
                                        "seconds": time.perf_counter() - t0})


def d4_rank(emb: np.ndarray, n_clusters: int, eps: float, seed: int) -> np.ndarray:
    """D4's preference order as ranks (0 = taken first): the sequences already passed MinHash (study_data),
    SemDeDup survivors come before the removed ones, and within each group the farther from its SSL prototype
    (re-clustered on the survivors, as D4 does) the earlier; taking the first k ranks is D4 at k."""
    from exp_curriculum.selection import prototype_scores, semdedup

    keep = semdedup(emb, n_clusters, eps, seed)
    surv = np.flatnonzero(keep)
    far = np.zeros(len(emb))
    if len(surv) >= n_clusters:
        far[surv] = prototype_scores(emb[surv], n_clusters, seed)
    order = np.lexsort((-far, ~keep))            # survivors first, then farthest from the prototype
    rank = np.empty(len(emb))
    rank[order] = np.arange(len(emb))
    return rank


def stage_study_train(ctx: StageContext) -> None:
    """Every run of the study; a run's result file appears when it finishes, its checkpoints before.
    Other processes may train runs of the same study at the same time into the shared run cache
    (``exp_curriculum/study_worker.py``): a run claimed by a live worker is waited for, not trained twice."""
    import torch

    from common.train import make_accelerator

    cfg, s = ctx.cfg, ctx.cfg.study
    torch.set_num_threads(cfg.threads)
    folder = ctx.out_dir / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    cache = run_cache(ctx)  # runs shared by every arm list: adding an arm or a seed trains only the new runs
    accelerator = make_accelerator(st.train_config(s, "constant", 0, 1, ctx.out_dir), out_dir=ctx.out_dir)
    train_jobs(ctx, cache, accelerator, folder)


def train_jobs(ctx: StageContext, cache: Path, accelerator, folder: Path | None = None,
               reverse: bool = False) -> None:
    """Train the study's runs missing from ``cache`` (in job order, or from the end with ``reverse``) and
    copy every result into ``folder``. In a single-process world a run is first claimed (an exclusive
    ``<name>.claim`` file with the claimant's pid): runs claimed by another live process are skipped, then
    waited for at the end (and trained here if their claimant died)."""
    from tqdm.auto import tqdm

    s = ctx.cfg.study
    data = _load_data(ctx)
    table, seqs = data["table"], data["sequences"]
    cands = scores = None
    if ctx.has_input("study_select") and (ctx.input("study_select") / "select_scores.parquet").is_file():
        scores = pd.read_parquet(ctx.input("study_select") / "select_scores.parquet")
        cands = scores["row"].to_numpy()
    elif any(a.kind == "select" for a in s.parsed_arms()):
        cands = arms_mod.selection_candidates(table, s.budget_sequences, s.en_fraction, s.select.factor)
        scores = pd.DataFrame({"row": cands})
    todo = st.jobs(s)[::-1] if reverse else st.jobs(s)
    arms = {a.spec: a for a in s.parsed_arms()}
    n_samples = s.steps() * s.train.global_batch
    claims = accelerator.num_processes == 1   # DDP ranks train every run together: no claims between them
    print(f"study_train: {len(todo)} runs, {st.describe_budget(s)}, {accelerator.num_processes} process(es)")

    def train_one(k: int, job: dict) -> None:
        arm = arms[job["arm"]]
        pool = arms_mod.arm_pool(table, arm, s.budget_sequences, s.en_fraction, job["seed"], cands, scores)
        order = arms_mod.arm_order(table, pool, arm, n_samples, job["seed"], s.train.global_batch)
        t0 = time.perf_counter()
        result = st.run_job(job, s, seqs, pool[order], data["val"], data["info"]["vocab_size"],
                            cache / "train" / job["name"], accelerator)
        result["world_size"] = accelerator.num_processes
        result["pool_en_fraction"] = float((table["language"].to_numpy()[pool] == "en").mean())
        result["pool_difficulty"] = _pool_profile(table, pool[order], s.data.languages)
        if ctx.is_main:
            st.save_job(cache, result)
        ctx.barrier()
        print(f"[{k + 1}/{len(todo)}] {job['name']}: final val "
              f"{ {lg: round(result['curve'][-1][f'val_{lg}'], 4) for lg in s.data.languages} } "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)

    waiting = []
    for k, job in enumerate(tqdm(todo, desc="study runs", disable=not ctx.is_main)):
        if (cache / f"{job['name']}.json").exists():
            continue
        if claims and not claim_run(cache, job["name"]):
            waiting.append((k, job))      # another live process trains it
            continue
        train_one(k, job)
    while waiting:                        # runs of other workers: wait, or take over a dead worker's run
        k, job = waiting.pop(0)
        if (cache / f"{job['name']}.json").exists():
            continue
        if claim_run(cache, job["name"]):
            train_one(k, job)
        else:
            waiting.append((k, job))
            time.sleep(5)
    if folder is not None and ctx.is_main:
        for job in st.jobs(s):
            st.save_job(folder, json.loads((cache / f"{job['name']}.json").read_text(encoding="utf-8")))


def claim_run(cache: Path, name: str) -> bool:
    """True when this process may train run ``name``: it created the claim, it holds it already, or the
    claimant's process is gone (same machine: claims hold a pid and the host name)."""
    import os
    import socket

    path = cache / "train" / f"{name}.claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        with open(path, "x", encoding="utf-8") as f:
            json.dump(me, f)
        return True
    except FileExistsError:
        try:
            owner = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False                  # being written right now
        if owner == me:
            return True
        if owner.get("host") != me["host"]:
            return False                  # another machine's worker: cannot tell whether it is alive
        try:
            os.kill(int(owner["pid"]), 0)
            return False
        except ProcessLookupError:
            path.unlink(missing_ok=True)  # its claimant died: claim it afresh
            return claim_run(cache, name)
        except PermissionError:
            return False


# what one run's training depends on (not the arm list, the seeds or the table's smoothing)
RUN_KEYS = ("study.data", "study.model", "study.train", "study.select", "study.budget_sequences",
            "study.en_fraction")


def run_cache(ctx: StageContext) -> Path:
    """<outputs>/exp_curriculum/study_runs/<hash>/: finished runs (one JSON each) and their checkpoints,
    keyed by RUN_KEYS and the input stages' folders."""
    import hashlib

    from common.config import to_dict
    from common.stages import select_keys

    spec = {"keys": select_keys(to_dict(ctx.cfg), RUN_KEYS),
            "inputs": {k: v.name if v is not None else None for k, v in sorted(ctx.input_dirs.items())},
            "version": STUDY_RUN_VERSION}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = ctx.out_dir.parent.parent / "study_runs" / key
    if ctx.is_main:
        (root / "train").mkdir(parents=True, exist_ok=True)
        (root / "spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True, default=str), encoding="utf-8")
    ctx.barrier()
    return root


STUDY_RUN_VERSION = "1"


def _pool_profile(table: pd.DataFrame, rows: np.ndarray, languages: list[str]) -> dict:
    """Mean signed difficulty (per-language CDF over the whole candidate set) of each tenth of the run, per
    metric: the order's difficulty profile over time, stored with the run."""
    from common.curriculum import difficulty_cdf
    from exp_curriculum.study_data import METRICS, difficulty_scores

    out = {}
    for metric, (col, _) in METRICS.items():
        if col not in table:
            continue
        d = difficulty_cdf(difficulty_scores(table, metric), groups=table["language"].to_numpy())
        out[metric] = [float(x.mean()) for x in np.array_split(d[rows], 10)]
    return out


def stage_study_table(ctx: StageContext) -> None:
    """Rows: the curves, per-run convergence metrics, and paired differences arm - random per schedule."""
    s = ctx.cfg.study
    names = [j["name"] for j in st.jobs(s)]
    folder = ctx.input("study_train") / "runs"
    missing = [n for n in names if not (folder / f"{n}.json").is_file()]
    if missing:
        raise StageInputError(f"study_train has no result for {missing[:3]} (rerun --stage study_train)")
    results = st.load_jobs(folder, names)
    langs = s.data.languages
    for r in results:
        base = {"schedule": r["schedule"], "seed": r["seed"]}
        for p in r["curve"]:
            for lg in langs:
                ctx.log(table=TABLE_CURVES, method=r["arm"], metric=f"val_loss_{lg}", value=p[f"val_{lg}"],
                        params={**base, "step": p["step"], "tokens": p["tokens"]})
        ctx.log(table=TABLE_CURVES, method=r["arm"], metric="seconds", value=r["seconds"],
                params={**base, "steps": r["steps"], "n_params": r["n_params"]})
    per_run = convergence_rows(results, langs, s.smoothing)
    for row in per_run:
        if math.isfinite(row["value"]):  # a censored tokens_to_target has no value; its 'reached' row says 0
            ctx.log(table=TABLE_CONV, method=row["arm"], metric=row["metric"], value=row["value"],
                    params={"schedule": row["schedule"], "seed": row["seed"], "eval": row["eval"]})
    for row in paired_rows(per_run):
        arm, metric, mean = row.pop("arm"), row.pop("metric"), row.pop("mean")
        params = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        if math.isfinite(mean):
            ctx.log(table=TABLE_DIFF, method=arm, metric=metric, value=mean, n=row["n"], params=params)
    print(f"study_table: {len(results)} runs -> {len(ctx.rows)} rows")


def _series(res: dict, ev: str, languages: list[str]) -> tuple[list[float], list[float]]:
    """(tokens, loss) of a run's curve on one evaluation set ('mean' = the languages' mean)."""
    return ([p["tokens"] for p in res["curve"]],
            [st.mixed_loss(p, languages) if ev == "mean" else p[f"val_{ev}"] for p in res["curve"]])


def convergence_rows(results: list[dict], languages: list[str], smoothing: float) -> list[dict]:
    """Per run and evaluation set (each language and their mean): tokens to the baseline's target, speed-up,
    AUC and final loss, against the random baseline of the same schedule and seed."""
    base = {(r["schedule"], r["seed"]): r for r in results if r["arm"] == "random"}
    out = []
    for r in results:
        b = base.get((r["schedule"], r["seed"]))
        if b is None:
            continue
        for ev in [*languages, "mean"]:
            t, y = _series(r, ev, languages)
            bt, by = _series(b, ev, languages)
            m = conv.curve_metrics(t, y, bt, by, smoothing)
            for metric in ("tokens_to_target", "speedup", "reached", "auc", "final_loss"):
                out.append({"arm": r["arm"], "schedule": r["schedule"], "seed": r["seed"], "eval": ev,
                            "metric": metric, "value": m[metric]})
    return out


def paired_rows(per_run: list[dict]) -> list[dict]:
    """Mean over seeds of arm - random (speed-up: the arm's own, as the baseline's is 0 by definition), with
    the bootstrap and t intervals; 'resolved' says whether the t-interval excludes 0 (and in which direction)."""
    df = pd.DataFrame(per_run)
    if df.empty:
        return []
    out = []
    base = df[df["arm"] == "random"].set_index(["schedule", "seed", "eval", "metric"])["value"]
    for (arm, schedule, ev, metric), g in df[df["arm"] != "random"].groupby(["arm", "schedule", "eval", "metric"]):
        if metric == "reached":
            continue
        vals = []
        for _, row in g.iterrows():
            b = base.get((schedule, row["seed"], ev, metric), math.nan)
            vals.append(row["value"] if metric == "speedup" else row["value"] - b)
        ci = conv.paired_ci(vals)
        good = ci if metric != "speedup" else {**ci, "t_low": -ci["t_high"], "t_high": -ci["t_low"]}
        out.append({"arm": arm, "metric": f"{metric}" if metric == "speedup" else f"{metric}_minus_random",
                    "schedule": schedule, "eval": ev, "mean": ci["mean"], "n": ci["n"],
                    "n_missing": ci["n_missing"], "std": ci["std"], "boot_low": ci["boot_low"],
                    "boot_high": ci["boot_high"], "t_low": ci["t_low"], "t_high": ci["t_high"],
                    "verdict": conv.resolved(good)})
    return out


STUDY_KEYS = ("seed", "study")
STAGES = [
    Stage("study_data", stage_study_data, config_keys=("seed", "study.data"), inputs=("metrics", "dedup"),
          description="study: EN+FR BPE, fixed-length sequences, validation sets, per-sequence metrics"),
    Stage("study_reference", stage_study_reference,
          config_keys=("seed", "study.model", "study.reference", "study.train.global_batch",
                       "study.train.warmup_steps", "study.train.checkpoint_every"),
          inputs=("study_data",), resumable=True,
          description="study: reference LM on reserved sequences -> per-sequence NLL"),
    Stage("study_select", stage_study_select,
          config_keys=("seed", "study.select", "study.budget_sequences", "study.en_fraction", "study.arms"),
          inputs=("study_data", "study_reference"),
          description="study: ASK-LLM / Density / D4 scores of the selection candidates"),
    Stage("study_train", stage_study_train, config_keys=STUDY_KEYS,
          inputs=("study_data", "study_reference", "study_select"), resumable=True,
          description="study: every (schedule, arm, seed) training run"),
    Stage("study_table", stage_study_table, config_keys=STUDY_KEYS, inputs=("study_train",), cache=False,
          description="study: curves, convergence, paired differences -> rows"),
]
