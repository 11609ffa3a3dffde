"""The interface every vision-language backbone offers the prompt learners (CoOp, CoCoOp, KgCoOp, PLPP).

A prompt learner never calls a backbone's own ``forward``: it builds prompt *embeddings* (learned context
vectors spliced between the BOS embedding and the class-name tokens) and needs the text encoder to run on
them, with the per-position hidden states PLPP's LM head reads. So a backbone exposes:

* ``token_embedding``: the frozen input-embedding matrix E (V x d); PLPP's cosine labels are taken against
  its rows and its transpose is PLPP's training-free LM head;
* ``tokenize(texts)``: ids, attention mask and the pooling position of each text, padded to one length;
* ``encode_text_embeddings(embeds, attention_mask, pool_index)``: hidden states after the final norm and
  before the projection (B x L x d), and the projected, unnormalised text features (B x D);
* ``encode_image(pixels)``: projected, unnormalised image features (B x D);
* ``logit_scale``: log of CLIP's temperature (``exp()`` multiplies cosine similarities);
* ``causal``: whether the text transformer is causal (then the states at positions before the class name
  are the same for every class, which PLPP's LM head exploits).

Implementations: ``exp_plpp.clip_hf.HFCLIP`` (transformers ``CLIPModel``, real weights by hub ID or path,
or a random config for tests) and ``exp_plpp.offline_clip.OfflineCLIP`` (the dual encoder trained here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Tokens:
    """Tokenised texts padded to one length L."""

    input_ids: torch.Tensor        # (B, L) long
    attention_mask: torch.Tensor   # (B, L) long, 1 = real token
    pool_index: torch.Tensor       # (B,) long: the position whose state is the text feature (CLIP: EOT)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class VisionLanguageModel(nn.Module):
    """Frozen dual encoder as the prompt learners see it (see the module docstring)."""

    causal: bool = False
    # position of the first token after BOS: where CoOp's context vectors go
    first_text_position: int = 1
    # mean pooling (all-MiniLM) vs one pooling position (CLIP's EOT)
    mean_pool: bool = False

    @property
    def token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def width(self) -> int:
        """d: the width of the token embeddings and of the text encoder's hidden states."""
        return int(self.token_embedding.weight.shape[1])

    @property
    def logit_scale(self) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> Tokens:
        raise NotImplementedError

    def encode_text_embeddings(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                               pool_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Projected text features of plain texts (zero-shot classifiers, KgCoOp's hand-crafted reference)."""
        tok = self.tokenize(texts)
        embeds = self.token_embedding(tok.input_ids)
        return self.encode_text_embeddings(embeds, tok.attention_mask, tok.pool_index)[1]

    def freeze(self) -> VisionLanguageModel:
        """Every parameter frozen and eval mode: prompt learning trains only the prompt learner."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()
