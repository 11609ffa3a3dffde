"""transformers ``CLIPModel`` as a ``VisionLanguageModel``: real weights by hub ID or local folder, or a
tiny random-init CLIP with a word-level tokenizer for offline tests.

The text path re-runs CLIP's own text modules on spliced prompt embeddings, in the order and with the masks
``CLIPTextModel.forward`` uses (transformers 5.x): position embedding (``CLIPTextEmbeddings`` with
``inputs_embeds``), ``create_causal_mask`` (causal AND padding), ``CLIPEncoder``, ``final_layer_norm``,
pooling at the EOT position, ``text_projection``. The tests check it equals ``get_text_features``.

open_clip is not wrapped here: it is not installed offline, so a wrapper could not be tested.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, PreTrainedTokenizerFast
from transformers.masking_utils import create_causal_mask
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from common import paths
from common.models import ModelNotAvailableError
from exp_plpp.model import Tokens, VisionLanguageModel

log = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
UNK = "[UNK]"
CONTEXT_LENGTH = 77  # CLIP's text context (OpenAI and open_clip)
# always in the tiny vocabulary: CoOp's "X X X X" placeholder prefix and the prompt's final "."
BASE_WORDS = ("x", ".", ",")
# legacy CLIP configs (before transformers PR #24773) carry eos_token_id == 2 and pool at argmax(ids)
LEGACY_EOS_ID = 2


class HFCLIP(VisionLanguageModel):
    """A frozen transformers ``CLIPModel`` and its tokenizer."""

    causal = True
    first_text_position = 1
    mean_pool = False

    def __init__(self, model: CLIPModel, tokenizer) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        vision = model.config.vision_config
        self.image_size = int(vision.image_size)
        # the model's inputs are already normalised pixels; these say how (OpenAI CLIP's constants)
        self.image_mean = tuple(OPENAI_CLIP_MEAN)
        self.image_std = tuple(OPENAI_CLIP_STD)
        text = model.config.text_config
        self.context_length = min(CONTEXT_LENGTH, int(text.max_position_embeddings))
        self.eos_token_id = int(tokenizer.convert_tokens_to_ids(tokenizer.eos_token))
        self.freeze()

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype = torch.float32,
                        cache_dir: str | Path | None = None) -> HFCLIP:
        """CLIP weights + tokenizer from a hub ID (e.g. ``openai/clip-vit-base-patch16``) or a local
        ``save_pretrained`` folder; raises ModelNotAvailableError when neither can provide them."""
        path = Path(name_or_path)
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"{path} is a folder but holds no config.json (not a model folder)")
        try:
            model = CLIPModel.from_pretrained(name_or_path, dtype=dtype, cache_dir=cache_dir)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir)
        except (OSError, ValueError) as exc:
            log.debug("CLIP load of %s failed: %r", name_or_path, exc)
            raise ModelNotAvailableError(
                f"cannot load CLIP '{name_or_path}': not a local model folder, and the hub "
                f"{'is disabled (HF_HUB_OFFLINE=1)' if paths.hub_offline() else 'could not provide it'}. "
                f"Download it elsewhere with `hf download {name_or_path} --local-dir DIR` and pass DIR.") from None
        return cls(model, tokenizer)

    @classmethod
    def random(cls, config: CLIPConfig | None = None, tokenizer=None, seed: int = 0) -> HFCLIP:
        """A random-init CLIP (tiny by default) with a word-level tokenizer, for tests."""
        tokenizer = tokenizer if tokenizer is not None else word_tokenizer([])
        config = config if config is not None else tiny_config(tokenizer)
        if config.text_config.vocab_size < len(tokenizer):
            raise ValueError(f"config vocab_size {config.text_config.vocab_size} < tokenizer size {len(tokenizer)}")
        torch.manual_seed(seed)
        return cls(CLIPModel(config), tokenizer)

    def save_pretrained(self, path: str | Path) -> None:
        """Model + tokenizer in one folder that ``from_pretrained(path)`` reads back."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    # ---- VisionLanguageModel ------------------------------------------------------------------------

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        return self.model.text_model.embeddings.token_embedding

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def tokenize(self, texts: list[str]) -> Tokens:
        """Pad to the longest text; texts longer than 77 tokens lose their last words (BOS and EOT kept)."""
        enc = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=self.context_length, return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        return Tokens(ids, mask, self.pool_positions(ids))

    def pool_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The EOT position exactly as ``CLIPTextModel.forward`` pools it (legacy rule for eos id 2)."""
        ids = input_ids.to(dtype=torch.int)
        if self.model.text_model.eos_token_id == LEGACY_EOS_ID:
            return ids.argmax(dim=-1).long()
        return (ids == self.model.text_model.eos_token_id).int().argmax(dim=-1).long()

    def encode_text_embeddings(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                               pool_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden after final_layer_norm (B, L, d), projected unnormalised features (B, D))."""
        tm = self.model.text_model
        embeds = embeds.to(self.token_embedding.weight.dtype)  # fp32 prompt vectors into an fp16/bf16 CLIP
        hidden = tm.embeddings(inputs_embeds=embeds)  # adds the position embedding
        # the same causal + padding mask CLIPTextModel.forward builds (None = sdpa's is_causal path)
        mask = create_causal_mask(config=tm.config, inputs_embeds=hidden,
                                  attention_mask=attention_mask.to(hidden.device), past_key_values=None)
        hidden = tm.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        hidden = tm.final_layer_norm(hidden)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = hidden[rows, pool_index.to(hidden.device)]
        return hidden, self.model.text_projection(pooled)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected unnormalised image features of normalised pixels (B, 3, H, W)."""
        pixels = pixels.to(device=self.device, dtype=self.model.visual_projection.weight.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled)


# ---- tiny offline model ---------------------------------------------------------------------------------


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lowercase, split on whitespace and punctuation, BOS/EOT around each text.

    Vocabulary: the given words (lowercased, deduplicated, in order) plus BASE_WORDS, then [UNK], BOS and
    EOT last, so EOT has the highest id as in OpenAI's BPE (both of transformers' pooling rules agree).
    Padding uses EOT, as CLIP's tokenizer does."""
    vocab_words = list(dict.fromkeys([*BASE_WORDS, *(w.lower() for w in words)]))
    vocab = {w: i for i, w in enumerate([*vocab_words, UNK, BOS, EOS])}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace + each punctuation mark
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=EOS, model_max_length=CONTEXT_LENGTH)


def tiny_config(tokenizer: PreTrainedTokenizerFast, width: int = 32, layers: int = 2, heads: int = 2,
                image_size: int = 16, patch_size: int = 8, projection_dim: int = 16) -> CLIPConfig:
    """A tiny CLIP whose text vocabulary and special ids match ``tokenizer`` (non-legacy EOT pooling)."""
    ids = {name: int(tokenizer.convert_tokens_to_ids(t)) for name, t in
           (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("pad", tokenizer.pad_token))}
    common = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                  num_attention_heads=heads)
    text = dict(common, vocab_size=len(tokenizer), max_position_embeddings=CONTEXT_LENGTH,
                bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    vision = dict(common, image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def tiny_clip(words: list[str], seed: int = 0) -> HFCLIP:
    """A tiny random CLIP whose vocabulary holds ``words`` (class names, prompt words) + BASE_WORDS."""
    return HFCLIP.random(tokenizer=word_tokenizer(words), seed=seed)
