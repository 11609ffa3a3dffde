"""exp_distill_data.source: the offline OPT-architecture source model.

Oracles: the validation perplexity is recomputed from the reloaded folder with a hand-written shifted
cross-entropy, the unigram perplexity with a Counter, the saved weights against the training checkpoint's
raw tensors; determinism and resume are checked by exact equality with an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.models import ModelNotAvailableError, build_causal_lm, cache_dir, load_causal_lm
from common.results import Run
from exp_distill_data.source import (
    CURVE_TABLE,
    PROFILES,
    TABLE,
    SourceConfig,
    pack_blocks,
    prepare_documents,
    pretrain_source,
    source_documents,
    split_documents,
    split_text,
    strip_gutenberg,
    token_stream,
    train_source_tokenizer,
)

torch.set_num_threads(1)

ANIMALS = ["cat", "dog", "bird", "fox", "horse", "sheep"]
PLACES = ["garden", "house", "river", "forest", "field"]
VERBS = ["runs to", "sleeps in", "looks at", "walks into"]


def _corpus(n_docs: int = 150, seed: int = 0) -> list[str]:
    """Templated sentences: strong next-word structure (a bigram model beats the unigram one easily)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        sents = [f"The {rng.choice(ANIMALS)} {rng.choice(VERBS)} the {rng.choice(PLACES)}." for _ in range(4)]
        docs.append(f"Story {i}. " + " ".join(sents))
    return docs


def _tiny_cfg(**kw) -> SourceConfig:
    base = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, ffn=64, max_seq_len=64, seq_len=32,
                batch_size=8, token_budget=32 * 8 * 120, lr=1e-2, warmup_ratio=0.05, decay_fraction=0.2,
                val_fraction=0.1, val_max_tokens=0, eval_every=40, checkpoint_every=30, log_every=10,
                keep_train_state=True, seed=0)
    return SourceConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny pretraining run, logged into a real results Run."""
    root = tmp_path_factory.mktemp("source")
    run = Run("exp_distill_data", root=root / "results")
    cfg = _tiny_cfg()
    info = pretrain_source(cfg, root / "out", run=run, documents=_corpus())
    return cfg, root / "out", info, run


def _val_blocks(cfg: SourceConfig, tok) -> torch.Tensor:
    _, val, _ = prepare_documents(cfg, _corpus())
    return pack_blocks(token_stream(tok, val, tok.eos_token_id), cfg.seq_len, cfg.val_max_tokens)


# ---------------------------------------------------------------------------------------- data
def test_split_text_rejoins_at_boundaries():
    text = "\n\n".join(f"Paragraph {i}. " + "word " * 30 for i in range(20))
    pieces = split_text(text, 200)
    assert "".join(pieces) == text
    assert all(p.endswith("\n\n") for p in pieces[:-2])      # cut at paragraph breaks...
    assert pieces[-2].endswith(" ")                          # ...else (last paragraph) at a space
    assert all(len(p) >= 200 for p in pieces[:-1])
    assert split_text("short", 200) == ["short"]
    assert "".join(split_text("x" * 1000, 100)) == "x" * 1000  # no boundary at all: hard cuts


def test_strip_gutenberg():
    text = ("licence header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody text\n"
            "            *** END OF THE PROJECT GUTENBERG EBOOK X ***\nfooter")
    assert strip_gutenberg(text).strip() == "body text"
    assert strip_gutenberg("no markers") == "no markers"


def test_split_documents_disjoint_deterministic():
    docs = _corpus(100) + _corpus(10)  # the second part duplicates the first 10 documents exactly
    train, val = split_documents(docs, 0.1, seed=3)
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(docs) and len(train) + len(val) == 100
    assert len(val) == 10
    assert (train, val) == split_documents(docs, 0.1, seed=3)
    assert val != split_documents(docs, 0.1, seed=4)[1]


def test_contaminated_documents_dropped():
    from common.decontam import build_eval_index

    test_question = "Which of these animals lives in the river and eats small fish every single day?"
    docs = _corpus(60) + [f"Some notes. {test_question} The answer is the otter."]
    cfg = SourceConfig(val_fraction=0.1)
    train, val, dropped = prepare_documents(cfg, docs, eval_index=build_eval_index({"arc": [test_question]}))
    assert dropped == 1 and len(train) + len(val) == 60
    assert not any("otter" in d for d in train + val)
    assert prepare_documents(cfg, docs)[2] == 0


def test_source_documents_real_data(data_root):
    cfg = SourceConfig(sources=("text:en/tinyshakespeare", "self_instruct"), doc_chars=2000)
    docs = source_documents(cfg)
    seeds = [json.loads(line) for line in (data_root / "instruct/self_instruct/seed_tasks.jsonl").open()]
    plays = docs[:-len(seeds)]
    assert "".join(plays) == (data_root / "text/en/tinyshakespeare/input.txt").read_text()
    assert 450 < len(plays) < 560 and all(len(d) < 4000 for d in plays)   # 1.1 MB in ~2000-char pieces
    first = seeds[0]["instances"][0]
    expected = seeds[0]["instruction"] + (f"\n{first['input']}" if first["input"] else "") + "\n" + first["output"]
    assert docs[len(plays)] == expected                                    # prompt \n answer


# ----------------------------------------------------------------------------------- tokenizer
def test_tokenizer_specials_and_vocab_differs_from_smollm2(tmp_path):
    tok = train_source_tokenizer(_corpus(), 400, tmp_path / "tok")
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0, "<pad>", 1)
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    text = "The fox walks into the forest."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    smol = _smollm2_tokenizer()
    assert tok.get_vocab() != smol.get_vocab() and len(tok) != len(smol)
    assert tok(text, add_special_tokens=False)["input_ids"] != smol(text, add_special_tokens=False)["input_ids"]


def _smollm2_tokenizer():
    """SmolLM2's tokenizer: from the converted-model cache when it is there (no 135M-weight load)."""
    from transformers import AutoTokenizer

    cached = cache_dir() / "models" / "smollm2-135m-instruct"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    try:
        return load_causal_lm("smollm2-135m-instruct")[1]
    except ModelNotAvailableError:
        pytest.skip("offline SmolLM2 not installed")


# ------------------------------------------------------------------------------------ pretrain
def test_pretrain_beats_unigram(trained):
    cfg, out, info, _ = trained
    assert set(info) >= {"val_ppl", "unigram_ppl", "train_tokens", "params", "seconds", "model"}
    assert math.isfinite(info["val_ppl"])
    assert info["val_ppl"] < 0.3 * info["unigram_ppl"]  # ~0.1 here; untrained: > unigram
    assert info["val_ppl"] < info["vocab_size"] <= cfg.vocab_size
    assert info["train_tokens"] == 120 * 8 * 32 and info["steps"] == 120
    assert info["model"] == str(out / "model")
    assert json.loads((out / "source.json").read_text())["val_ppl"] == info["val_ppl"]


def test_reload_same_logits_and_perplexity(trained):
    cfg, out, info, _ = trained
    model, tok = load_causal_lm(info["model"])
    assert model.config.model_type == "opt" and len(tok) == info["vocab_size"]
    # the saved weights = the final training checkpoint's raw tensors (tied lm_head included)
    from safetensors.torch import load_file
    fresh = build_causal_lm("opt", vocab_size=len(tok), d_model=cfg.d_model, n_layers=cfg.n_layers,
                            n_heads=cfg.n_heads, d_ff=cfg.ffn, max_seq_len=cfg.max_seq_len).eval()
    fresh.load_state_dict(load_file(out / "train" / "step_00000120" / "model.safetensors"), strict=False)
    blocks = _val_blocks(cfg, tok)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
        assert torch.equal(logits, fresh(input_ids=blocks).logits)
    # perplexity by hand: shifted cross-entropy over every block
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert math.exp(nll.item()) == pytest.approx(info["val_ppl"], rel=1e-5)
    assert info["val_tokens"] == blocks[:, 1:].numel()


def test_unigram_perplexity_by_counter(trained):
    cfg, out, info, _ = trained
    _, tok = load_causal_lm(info["model"])
    train, _ = split_documents(_corpus(), cfg.val_fraction, cfg.seed)
    counts = Counter()
    for doc in train:
        counts.update(tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    total = sum(counts.values()) + len(tok)
    targets = _val_blocks(cfg, tok)[:, 1:].reshape(-1).tolist()
    ppl = math.exp(-sum(math.log((counts[t] + 1) / total) for t in targets) / len(targets))
    assert ppl == pytest.approx(info["unigram_ppl"], rel=1e-9)


def test_inputs_embeds_and_lora(trained):
    from peft import PeftModel
    from torch.func import functional_call

    from common.sft import apply_lora

    _, _, info, _ = trained
    model, tok = load_causal_lm(info["model"])
    ids = tok(["The cat sleeps in the house."], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        by_ids = model(input_ids=ids).logits
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert torch.allclose(by_ids, by_embeds, atol=1e-6)

    peft = apply_lora(model, r=4, alpha=8, dropout=0.0, seed=0)
    assert isinstance(peft, PeftModel)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "out_proj"}
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 4 * 2  # A and B x 4 projections x 2 layers
    # the trajectory-matching inner loop: gradients reach both the prompt embeddings and the adapters
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    params = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    loss = functional_call(peft, params, args=(), kwargs={"inputs_embeds": embeds, "labels": ids}).loss
    grads = torch.autograd.grad(loss, [embeds] + [p for n, p in params.items() if "lora_B" in n],
                                create_graph=True)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_rows_logged(trained):
    _, _, info, run = trained
    rows = [json.loads(line) for line in (run.run_dir / "rows.jsonl").read_text().splitlines()]
    main = {r["metric"]: r for r in rows if r["table"] == TABLE}
    assert set(main) == {"val_ppl", "unigram_ppl", "train_tokens", "params"}
    assert main["val_ppl"]["value"] == pytest.approx(info["val_ppl"]) and main["val_ppl"]["n"] == info["val_tokens"]
    assert main["params"]["value"] == info["params"] and main["val_ppl"]["method"] == "opt-pretrained"
    curve = [r for r in rows if r["table"] == CURVE_TABLE and r["metric"] == "val_loss"]
    assert [r["params"]["step"] for r in curve] == [0, 40, 80, 120]
    assert math.exp(curve[-1]["value"]) == pytest.approx(info["val_ppl"])


def test_deterministic_and_resumes_after_interruption(trained, tmp_path):
    cfg, _, info, _ = trained
    assert pretrain_source(cfg, tmp_path / "again", documents=_corpus())["val_ppl"] == info["val_ppl"]

    class Stop(Exception):
        pass

    def die_at_70(event, data):
        if event == "step_end" and data["step"] == 70:
            raise Stop

    with pytest.raises(Stop):
        pretrain_source(cfg, tmp_path / "killed", documents=_corpus(), callbacks=[die_at_70])
    events = []
    resumed = pretrain_source(cfg, tmp_path / "killed", documents=_corpus(),
                              callbacks=[lambda e, d: events.append((e, d.get("step")))])
    assert ("resume", 60) in events                  # from the last checkpoint (every 30 steps)
    assert resumed["val_ppl"] == info["val_ppl"]     # bit-identical to the uninterrupted run


def test_hub_id_scores_without_training(trained, tmp_path):
    cfg, _, info, _ = trained
    scored = pretrain_source(SourceConfig(**{**cfg.__dict__, "hub_id": info["model"]}), tmp_path,
                             documents=_corpus())
    assert scored["steps"] == 0 and scored["train_tokens"] == 0 and scored["model"] == info["model"]
    assert scored["val_ppl"] == pytest.approx(info["val_ppl"], rel=1e-6)
    assert scored["unigram_ppl"] == pytest.approx(info["unigram_ppl"], rel=1e-12)
    assert not (tmp_path / "model").exists()


def test_config_profiles_and_validation():
    assert SourceConfig.for_profile("quick") == SourceConfig()
    small = SourceConfig.for_profile("small")
    small.validate()
    assert small.d_model > SourceConfig().d_model and small.token_budget > SourceConfig().token_budget
    assert SourceConfig.for_profile("paper").hub_id == "facebook/opt-1.3b"
    assert set(PROFILES) == {"quick", "small", "paper"}
    with pytest.raises(ValueError, match="source.d_model"):
        SourceConfig(d_model=30, n_heads=4).validate()
    with pytest.raises(ValueError, match="source.seq_len"):
        SourceConfig(seq_len=1024, max_seq_len=512).validate()
    with pytest.raises(ValueError, match="unknown source profile"):
        SourceConfig.for_profile("huge")
    assert Path(SourceConfig().sources[0].split(":", 1)[1]).parts[0] == "en"
