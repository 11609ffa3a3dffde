"""Supervised fine-tuning on instruction data: answer-only loss, LoRA (peft) or full fine-tuning.

Built on ``common.train.train`` (checkpoints, SIGKILL-safe resume, validation curves, trajectory
snapshots are inherited) and used by exp_distill_data (experts, baselines, transfer runs) and
exp_curriculum.

    model, tok = load_causal_lm("smollm2-135m-instruct")
    cfg = SFTConfig(method="lora", r=8, alpha=16, lr=1e-4, max_steps=200, snapshot_every=20)
    model = apply_lora(model, cfg.r, cfg.alpha, cfg.dropout)       # optional: finetune does it too
    res = finetune(model, tok, examples, cfg, "outputs/x", eval_examples=val)
    answer_loss(res.model, tok, val, cfg)                            # mean NLL per answer token
    save_trainable(res.model, "adapter.safetensors")                 # trainable tensors only

An example is a mapping with ``prompt`` (or ``instruction`` and optional ``input``) and ``answer`` (or
``output``). The prompt is rendered with the tokenizer's chat template when it has one (a user turn, plus
a system turn if ``system_prompt`` is set, then the generation prompt), else with a plain Alpaca-style
template (``### Instruction:\\n...\\n\\n### Response:\\n``). Labels are -100 on every prompt and padding
token; the loss is on the answer tokens and the EOS token that ends them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.train import (
    TrainConfig,
    TrainResult,
    evaluate,
    hf_causal_lm_eval,
    select_trainable,
    train,
    trainable_names,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

# LoRA target modules by transformers model_type: the attention projections (LESS's q/k/v/o choice).
# GPT-2's c_attn/c_proj are Conv1D layers (weight stored transposed): peft needs fan_in_fan_out=True.
# "attn.c_proj" (suffix match) keeps the MLP's c_proj out, as q/k/v/o does for Llama.
LORA_TARGETS: dict[str, list[str]] = {
    **{t: ["q_proj", "k_proj", "v_proj", "o_proj"]
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2")},
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
}
FAN_IN_FAN_OUT = {"gpt2"}


@dataclass
class SFTConfig:
    """Fine-tuning settings. Defaults follow LESS's training script (Xia et al. 2024,
    ``less/scripts/train/base_training_args.sh``): LoRA r 128, alpha 512, dropout 0.1 on q/k/v/o, lr 2e-5,
    4 epochs, warm-up 3 %, linear decay, bf16 on GPU, max length 2048 (here 512), batch 1 x grad-acc 32
    (the paper says 128; here 8 x 1). CPU profiles use smaller r, shorter max_len and a higher lr."""

    method: str = "lora"            # lora | full
    r: int = 128                    # LoRA rank
    alpha: float = 512.0            # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.1            # LoRA dropout
    targets: tuple[str, ...] | None = None  # LoRA target modules; None = LORA_TARGETS[model_type]
    trainable: tuple[str, ...] = ()  # glob patterns of parameter names to train; () = all (full) or
    #                                  the adapters (lora); under LoRA they match PeftModel names
    lr: float = 2e-5
    epochs: float = 4.0
    max_steps: int = 0              # > 0: train this many optimizer steps instead of `epochs`
    warmup_ratio: float = 0.03
    lr_schedule: str = "linear"     # constant | cosine | linear | wsd
    decay_fraction: float = 0.1     # wsd only
    batch_size: int = 8             # per process, per micro-batch
    grad_accum: int = 1
    weight_decay: float = 0.0
    optimizer: str = "adamw"        # adamw | sgd (MTT-style experts)
    momentum: float = 0.0           # sgd only
    max_grad_norm: float = 1.0
    mixed_precision: str = "fp32"   # fp32 | bf16
    max_len: int = 512              # tokens per example (prompt cut from the left first, see encode_example)
    template: str = "auto"          # auto (chat template if the tokenizer has one) | chat | plain
    system_prompt: str | None = None  # chat template: a system turn; None = the template's own default
    plain_template: str = PLAIN_PROMPT              # plain prompt, {instruction}
    plain_template_input: str = PLAIN_PROMPT_INPUT  # plain prompt of examples with an input, {instruction} {input}
    snapshot_every: int = 0         # trajectory snapshots of the trainable parameters; 0 = off
    snapshot_epochs: bool = False   # also a snapshot at each epoch's end (LESS's warm-up checkpoints)
    snapshot_optimizer: bool = False  # snapshots also hold Adam's moments (LESS's preconditioning)
    eval_every: int = 0             # validation answer loss every k steps (and at 0 and the end); 0 = end only
    eval_batch_size: int = 0        # 0 = batch_size
    checkpoint_every: int = 0       # 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    log_with: str = "tensorboard"   # tensorboard | wandb | mlflow | none
    seed: int = 0                   # data order, LoRA init, dropout
    cpu: bool = False

    def validate(self) -> None:
        if self.method not in ("lora", "full"):
            raise ValueError(f"sft.method must be lora|full, got {self.method!r}")
        if self.mixed_precision not in ("fp32", "bf16"):
            raise ValueError(f"sft.mixed_precision must be fp32|bf16, got {self.mixed_precision!r}")
        if self.template not in ("auto", "chat", "plain"):
            raise ValueError(f"sft.template must be auto|chat|plain, got {self.template!r}")
        if self.method == "lora" and (self.r < 1 or not 0 <= self.dropout < 1):
            raise ValueError(f"sft.r must be >= 1 and sft.dropout in [0, 1), got r={self.r}, dropout={self.dropout}")
        if self.max_len < 2:
            raise ValueError(f"sft.max_len must be >= 2, got {self.max_len}")
        self.train_config().validate()

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            max_steps=self.max_steps or 1, epochs=None if self.max_steps else self.epochs,
            batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr, weight_decay=self.weight_decay,
            optimizer=self.optimizer, momentum=self.momentum,
            warmup_ratio=self.warmup_ratio, lr_schedule=self.lr_schedule, decay_fraction=self.decay_fraction,
            max_grad_norm=self.max_grad_norm, mixed_precision="bf16" if self.mixed_precision == "bf16" else "no",
            checkpoint_every=self.checkpoint_every, keep_checkpoints=self.keep_checkpoints,
            log_every=self.log_every, seed=self.seed, cpu=self.cpu, eval_every=self.eval_every,
            eval_batch_size=self.eval_batch_size, snapshot_every=self.snapshot_every,
            snapshot_epochs=self.snapshot_epochs, snapshot_optimizer=self.snapshot_optimizer,
            trainable=tuple(self.trainable), log_with=self.log_with)


# ------------------------------------------------------------------------------------ formatting
def _fields(example: Mapping) -> tuple[str, str, str]:
    """(instruction, input, answer) of an example in either spelling."""
    instruction = example.get("prompt", example.get("instruction"))
    answer = example.get("answer", example.get("output"))
    if instruction is None or answer is None:
        raise KeyError(f"an example needs prompt|instruction and answer|output; got keys {sorted(example)}")
    return str(instruction), str(example.get("input") or ""), str(answer)


def uses_chat_template(tokenizer: Any, template: str = "auto") -> bool:
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' but the tokenizer has no chat_template")
    return template == "chat" or (template == "auto" and bool(getattr(tokenizer, "chat_template", None)))


def format_prompt(tokenizer: Any, example: Mapping, cfg: SFTConfig | None = None) -> tuple[str, str]:
    """(prompt text, answer text): the prompt ends where the model's answer starts."""
    cfg = cfg or SFTConfig()
    instruction, inp, answer = _fields(example)
    if uses_chat_template(tokenizer, cfg.template):
        user = f"{instruction}\n\n{inp}" if inp else instruction
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else []
        prompt = tokenizer.apply_chat_template(system + [{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
    else:
        prompt = (cfg.plain_template_input if inp else cfg.plain_template).format(instruction=instruction,
                                                                                  input=inp)
    return prompt, answer


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_example(tokenizer: Any, example: Mapping, cfg: SFTConfig | None = None) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (-100 on the prompt) of one example: prompt tokens, answer tokens, EOS.

    BPE merges could cross the prompt/answer boundary: the answer is taken from the tokenisation of the
    whole text when the prompt's own tokens are a prefix of it (the usual case: the tokens a model sees
    at inference), else tokenised on its own and appended, so the prompt's tokens are always exactly
    the prompt's tokenisation and the mask boundary is exact. Over ``cfg.max_len``: the answer keeps
    at least ``max_len // 2`` tokens (all of them if they fit) and the prompt is cut from the left.
    """
    cfg = cfg or SFTConfig()
    max_len = cfg.max_len
    prompt, answer = format_prompt(tokenizer, example, cfg)
    p = _ids(tokenizer, prompt)
    full = _ids(tokenizer, prompt + answer)
    a = full[len(p):] if full[:len(p)] == p else _ids(tokenizer, answer)
    if not uses_chat_template(tokenizer, cfg.template) and getattr(tokenizer, "add_bos_token", False) \
            and tokenizer.bos_token_id is not None and p[:1] != [tokenizer.bos_token_id]:
        p = [tokenizer.bos_token_id] + p  # a chat template writes its own BOS text
    if tokenizer.eos_token_id is not None:
        a = a + [tokenizer.eos_token_id]
    if len(p) + len(a) > max_len:
        keep_a = min(len(a), max(max_len - len(p), max_len // 2))
        a = a[:keep_a]
        p = p[len(p) - (max_len - keep_a):] if max_len > keep_a else []
    return {"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a}


def encode_examples(tokenizer: Any, examples: Iterable[Mapping], cfg: SFTConfig | None = None) -> list[dict]:
    cfg = cfg or SFTConfig()
    return [encode_example(tokenizer, ex, cfg) for ex in examples]


@dataclass
class SFTCollator:
    """Right-pads ``input_ids`` with ``pad_id`` and ``labels`` with -100; ``attention_mask`` 1 on tokens."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_collator(tokenizer: Any) -> SFTCollator:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return SFTCollator(int(pad))


# -------------------------------------------------------------------------------------- models
def default_lora_targets(model: torch.nn.Module) -> list[str]:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in LORA_TARGETS:
        raise ValueError(f"no default LoRA target modules for model_type {kind!r} (known: "
                         f"{', '.join(sorted(LORA_TARGETS))}); pass target_modules / sft.targets")
    return list(LORA_TARGETS[kind])


def apply_lora(model: torch.nn.Module, r: int = 128, alpha: float = 512.0, dropout: float = 0.1,
               target_modules: Iterable[str] | None = None, seed: int | None = None):
    """A peft ``PeftModel`` with LoRA adapters on ``target_modules`` (default: per architecture, see
    LORA_TARGETS); base weights frozen, only the adapters trainable. The adapters are injected into
    ``model`` in place: use the returned object from here on. ``seed`` seeds the adapters' init."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("the model already has adapters (a PeftModel)")
    targets = list(target_modules) if target_modules is not None else default_lora_targets(model)
    kind = getattr(model.config, "model_type", None)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM", fan_in_fan_out=kind in FAN_IN_FAN_OUT)
    if seed is not None:
        torch.manual_seed(seed)
    return get_peft_model(model, config)


def prepare_model(model: torch.nn.Module, cfg: SFTConfig) -> torch.nn.Module:
    """LoRA: wrap with adapters (unless already a PeftModel). Full: every parameter trainable, or only
    those matching ``cfg.trainable``."""
    from peft import PeftModel

    if cfg.method == "lora":
        if not isinstance(model, PeftModel):
            model = apply_lora(model, cfg.r, cfg.alpha, cfg.dropout, cfg.targets, seed=cfg.seed)
    elif cfg.trainable:
        select_trainable(model, cfg.trainable)
    else:
        model.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------- save / load
def save_trainable(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """The trainable parameters (``requires_grad``) under their ``named_parameters`` names, as one
    safetensors file, written atomically. A PeftModel is saved unmerged (the adapters only)."""
    from safetensors.torch import save_file

    path = Path(path)
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().to("cpu", copy=True).contiguous() for n in trainable_names(model)}
    if not tensors:
        raise ValueError("the model has no trainable parameter to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_trainable(model: torch.nn.Module, path: str | Path, strict: bool = True) -> list[str]:
    """Copy the tensors saved by ``save_trainable`` (or a trajectory snapshot) into ``model``'s
    parameters, bit for bit. ``strict``: the file must hold exactly the model's trainable parameters.
    Returns the names loaded."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = sorted(set(saved) - set(params))
    missing = sorted(set(trainable_names(model)) - set(saved)) if strict else []
    if unknown or missing:
        raise KeyError(f"{path}: parameters not in the model {unknown[:5]}, trainable ones missing from "
                       f"the file {missing[:5]} (same architecture, LoRA config and targets?)")
    with torch.no_grad():
        for name, tensor in saved.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model's is "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)
    return sorted(saved)


# ------------------------------------------------------------------------------- train / evaluate
def finetune(model: torch.nn.Module, tokenizer: Any, examples: Iterable[Mapping], cfg: SFTConfig,
             out_dir: str | Path, eval_examples: Iterable[Mapping] | None = None, run: Any = None,
             callbacks: Iterable[Callable[[str, dict], None]] = (), accelerator: Any = None,
             curve_table: str | None = None, curve_params: dict | None = None,
             resume: bool = True) -> TrainResult:
    """Fine-tune ``model`` on ``examples`` with the loss on the answers only (``common.train.train``:
    resumes from ``out_dir``'s latest checkpoint). ``result.model`` is the trained model (a PeftModel for
    LoRA); ``result.evals`` holds (step, mean answer NLL on ``eval_examples``). Curve rows go to
    ``run`` under ``curve_table`` with method ``cfg.method``."""
    cfg.validate()
    model = prepare_model(model, cfg)
    train_data = encode_examples(tokenizer, examples, cfg)
    eval_data = _by_length(encode_examples(tokenizer, eval_examples, cfg)) if eval_examples is not None else None
    return train(model, train_data, cfg.train_config(), out_dir, collate_fn=make_collator(tokenizer),
                 callbacks=callbacks, accelerator=accelerator, resume=resume, eval_dataset=eval_data,
                 run=run, curve_table=curve_table, curve_method=cfg.method, curve_params=curve_params)


def _by_length(rows: list[dict]) -> list[dict]:
    # batches of similar lengths pad less; a per-token mean does not depend on the order
    return sorted(rows, key=lambda r: len(r["input_ids"]))


def answer_loss(model: torch.nn.Module, tokenizer: Any, examples: Iterable[Mapping],
                cfg: SFTConfig | None = None, batch_size: int = 8) -> float:
    """Mean negative log-likelihood per answer token (answer tokens + EOS, as trained), in nats."""
    data = _by_length(encode_examples(tokenizer, examples, cfg))
    return evaluate(model, data, hf_causal_lm_eval, batch_size, make_collator(tokenizer))
