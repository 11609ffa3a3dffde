"""The offline CLIP: a frozen pretrained text tower (all-MiniLM-L6-v2) with a learned projection, and a
small CNN image tower, trained contrastively here because no registry carries CLIP weights.

Why this shape: prompt learning on a random CLIP says nothing, and a text tower trained from scratch on a
few hundred captions knows no language, so nothing could transfer to class names it never saw. MiniLM
brings real word and sentence semantics (its word-embedding matrix is the E of PLPP's labels and LM head);
only the image tower and the text projection learn, from real images with class-name captions.

MiniLM is a bidirectional encoder pooled by the attention-masked mean (its own pooling), so the causal
invariance CLIP's text transformer gives PLPP does not hold here (``causal = False``): the LM head then
reads every class's context states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from exp_plpp.model import Tokens, VisionLanguageModel

# per-channel statistics the image tower normalises with (the testbed's images are uint8 RGB in [0, 255])
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass
class TowerConfig:
    text_model: str = "all-minilm-l6-v2"   # common.models.load_encoder name (offline alias, hub ID or path)
    embed_dim: int = 256                   # joint image-text space
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # CNN stages (stride 2 after the 1st)
    init_temperature: float = 0.07         # CLIP's initial temperature


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ImageTower(nn.Module):
    """A VGG-style CNN for 32 x 32 RGB images -> ``embed_dim`` (global average pooling, then a projection)."""

    def __init__(self, channels: tuple[int, ...], embed_dim: int):
        super().__init__()
        blocks, c_in = [], 3
        for i, c in enumerate(channels):
            blocks.append(_conv_block(c_in, c, stride=1 if i == 0 else 2))
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.projection = nn.Linear(c_in, embed_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(self.features(pixels).mean(dim=(2, 3)))


class OfflineCLIP(VisionLanguageModel):
    """Frozen MiniLM + learned text projection, CNN image tower, learnable temperature."""

    causal = False
    first_text_position = 1   # after [CLS]
    mean_pool = True
    image_size = 32
    image_mean = IMAGE_MEAN
    image_std = IMAGE_STD

    def __init__(self, text_model: nn.Module, tokenizer, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = text_model
        for p in self.text_model.parameters():   # the text tower is pretrained and stays frozen, always
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        d = int(text_model.config.hidden_size)
        self.text_projection = nn.Linear(d, cfg.embed_dim, bias=False)
        self.visual = ImageTower(tuple(cfg.channels), cfg.embed_dim)
        self._logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    @classmethod
    def build(cls, cfg: TowerConfig, seed: int = 0) -> OfflineCLIP:
        from common.models import load_encoder

        text_model, tokenizer = load_encoder(cfg.text_model)
        torch.manual_seed(seed)   # the trainable parts' initialisation
        return cls(text_model, tokenizer, cfg)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_model.get_input_embeddings()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._logit_scale

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What pretraining learns (the text tower is loaded by name, not stored)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text_model.")}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("text_model.")]
        if missing or unexpected:
            raise ValueError(f"offline CLIP checkpoint does not match the towers: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")

    def tokenize(self, texts: list[str]) -> Tokens:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        mask = enc["attention_mask"]
        return Tokens(enc["input_ids"], mask, mask.sum(1) - 1)   # pool_index: [SEP] (unused: mean pooling)

    def encode_text_embeddings(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                               pool_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.text_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return hidden, self.text_projection(pooled)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    @torch.no_grad()
    def pooled_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """MiniLM's mean-pooled states of plain texts (before the projection): pretraining caches these,
        since the text tower is frozen."""
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[i:i + batch_size])
            hidden = self.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
            m = tok.attention_mask.unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * m).sum(1) / m.sum(1).clamp(min=1.0))
        return torch.cat(out)


def normalise_images(images_uint8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float, normalised per channel."""
    x = images_uint8.permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s
