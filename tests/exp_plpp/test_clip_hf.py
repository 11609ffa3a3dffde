"""HFCLIP against transformers' own CLIPModel paths (get_text_features, get_image_features, pooler_output)
on a tiny random CLIP: the prompt-splicing text path must be CLIP's forward."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

from common.models import ModelNotAvailableError
from exp_plpp.clip_hf import HFCLIP, LEGACY_EOS_ID, tiny_clip, tiny_config, word_tokenizer

torch.set_num_threads(1)

CLASSES = ["cat", "sea lion", "great white shark", "dog"]  # 1, 2, 3, 1 tokens
WORDS = ["a", "photo", "of", "cat", "sea", "lion", "great", "white", "shark", "dog"]
TEXTS = ["a photo of a cat.", "sea lion", "a photo of a great white shark, a dog.", "dog"]
N_CTX = 4
ATOL = 1e-6


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def clip(request) -> HFCLIP:
    m = tiny_clip(WORDS, seed=0)
    m.model.set_attn_implementation(request.param)  # both attention paths build their masks differently
    return m


def prompts(classes: list[str]) -> list[str]:
    return [" ".join(["X"] * N_CTX) + f" {c}." for c in classes]


def splice(clip: HFCLIP, ids: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """CoOp's 'end' layout: [BOS] ctx_1..ctx_M [class tokens . EOT pad...]."""
    emb = clip.token_embedding(ids)
    ctx = ctx.unsqueeze(0).expand(ids.shape[0], -1, -1)
    return torch.cat([emb[:, :1], ctx, emb[:, 1 + N_CTX:]], dim=1)


def test_encode_text_equals_get_text_features(clip):
    tok = clip.tokenize(TEXTS)
    assert tok.attention_mask.sum(1).tolist() != [tok.input_ids.shape[1]] * len(TEXTS)  # padding present
    ours = clip.encode_text(TEXTS)
    ref = clip.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
    assert ours.shape == (len(TEXTS), 16)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    # one text alone (no padding: the mask-free causal path) gives the same feature as in the padded batch
    torch.testing.assert_close(clip.encode_text(TEXTS[1:2])[0], ours[1], atol=ATOL, rtol=0)


def test_hidden_states_equal_text_model_last_hidden_state(clip):
    tok = clip.tokenize(TEXTS)
    hidden, _ = clip.encode_text_embeddings(clip.token_embedding(tok.input_ids), tok.attention_mask,
                                            tok.pool_index)
    ref = clip.model.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    real = tok.attention_mask.bool()
    torch.testing.assert_close(hidden[real], ref[real], atol=ATOL, rtol=0)
    assert hidden.shape == (len(TEXTS), tok.input_ids.shape[1], clip.width)


def test_encode_image_equals_get_image_features(clip):
    pixels = torch.randn(3, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(1))
    ref = clip.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(clip.encode_image(pixels), ref, atol=ATOL, rtol=0)
    assert len(clip.image_mean) == len(clip.image_std) == 3


@pytest.mark.parametrize("legacy", [False, True])
def test_pool_index_is_transformers_pooling_position(legacy):
    tok = word_tokenizer(WORDS)
    tok.add_tokens(["zebra"])  # an added token gets an id above EOT: the two pooling rules now disagree
    cfg = tiny_config(tok)
    if legacy:  # pre-#24773 configs (e.g. openai/clip-vit-*): transformers pools at argmax(ids)
        cfg.text_config.eos_token_id = LEGACY_EOS_ID
    clip = HFCLIP.random(cfg, tok)
    texts = [*TEXTS, "a zebra and a dog"]
    t = clip.tokenize(texts)
    out = clip.model.text_model(input_ids=t.input_ids, attention_mask=t.attention_mask)
    rows = torch.arange(len(t))
    torch.testing.assert_close(out.last_hidden_state[rows, t.pool_index], out.pooler_output, atol=0, rtol=0)
    eot_first = (t.attention_mask.sum(1) - 1).tolist()  # the first EOT (padding is EOT too)
    assert t.pool_index.tolist()[:-1] == eot_first[:-1]
    assert t.pool_index[-1].item() == (2 if legacy else eot_first[-1])  # legacy: "zebra", the largest id


def test_truncation_keeps_bos_and_eot():
    clip = tiny_clip(WORDS)
    t = clip.tokenize(["cat " * 100, "dog"])
    assert t.input_ids.shape[1] == 77
    assert t.input_ids[0, 0] == clip.tokenizer.bos_token_id and t.input_ids[0, -1] == clip.eos_token_id
    assert t.pool_index.tolist() == [76, 2]
    ref = clip.model.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask).pooler_output
    torch.testing.assert_close(clip.encode_text(["cat " * 100, "dog"]), ref, atol=ATOL, rtol=0)


def _context_states(clip: HFCLIP, ctx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    tok = clip.tokenize(prompts(CLASSES))
    embeds = clip.token_embedding(tok.input_ids) if ctx is None else splice(clip, tok.input_ids, ctx)
    hidden, _ = clip.encode_text_embeddings(embeds, tok.attention_mask, tok.pool_index)
    return hidden, tok.input_ids


@pytest.mark.parametrize("spliced", [False, True])
def test_context_states_identical_across_classes(clip, spliced):
    ctx = torch.randn(N_CTX, clip.width, generator=torch.Generator().manual_seed(2)) * 0.02 if spliced else None
    with torch.no_grad():
        hidden, ids = _context_states(clip, ctx)
    assert len(set(clip.tokenize(CLASSES).attention_mask.sum(1).tolist())) == 3  # class names differ in length
    ctx_states = hidden[:, :1 + N_CTX]   # BOS + context: attend only to BOS and the context (causal)
    for i in range(1, len(CLASSES)):
        torch.testing.assert_close(ctx_states[i], ctx_states[0], atol=ATOL, rtol=0)
    # from the class name on the states differ (cat vs sea lion vs great white shark: different tokens)
    first_class = hidden[:, 1 + N_CTX]
    for i in range(1, 3):
        assert (first_class[i] - first_class[0]).abs().max() > 1e-3


def test_gradient_reaches_spliced_context_only(clip):
    ctx = torch.nn.Parameter(torch.randn(N_CTX, clip.width, generator=torch.Generator().manual_seed(3)) * 0.02)
    tok = clip.tokenize(prompts(CLASSES))
    _, feats = clip.encode_text_embeddings(splice(clip, tok.input_ids, ctx), tok.attention_mask, tok.pool_index)
    img = clip.encode_image(torch.randn(len(CLASSES), 3, clip.image_size, clip.image_size))
    logits = clip.logit_scale.exp() * torch.nn.functional.normalize(img, dim=-1) @ \
        torch.nn.functional.normalize(feats, dim=-1).T
    torch.nn.functional.cross_entropy(logits, torch.arange(len(CLASSES))).backward()
    assert ctx.grad is not None and torch.isfinite(ctx.grad).all() and ctx.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in clip.parameters())
    assert not clip.training


def test_hub_id_offline_raises_model_not_available(tmp_path, monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import: set its constant too; an empty cache = no local copy
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailableError, match="hf download"):
        HFCLIP.from_pretrained("openai/clip-vit-base-patch16", cache_dir=tmp_path)
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        HFCLIP.from_pretrained(str(tmp_path))


def test_save_and_load_round_trip(tmp_path):
    clip = tiny_clip(WORDS, seed=4)
    clip.save_pretrained(tmp_path)
    loaded = HFCLIP.from_pretrained(str(tmp_path))
    t, t2 = clip.tokenize(TEXTS), loaded.tokenize(TEXTS)
    assert torch.equal(t.input_ids, t2.input_ids) and torch.equal(t.pool_index, t2.pool_index)
    torch.testing.assert_close(loaded.encode_text(TEXTS), clip.encode_text(TEXTS), atol=0, rtol=0)
    pixels = torch.randn(2, 3, clip.image_size, clip.image_size)
    torch.testing.assert_close(loaded.encode_image(pixels), clip.encode_image(pixels), atol=0, rtol=0)
    assert all(not p.requires_grad for p in loaded.parameters())
