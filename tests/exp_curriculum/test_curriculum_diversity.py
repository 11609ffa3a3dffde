"""exp_curriculum diversity coefficient against the reference recipe (issue 16 item 11), on tiny random
GPT-2 / Llama probes: the Fisher against a brute-force per-micro-batch computation, the parameters the
embedding covers, padding, the target options, the spread, and the documents behind each group."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from common.models import build_causal_lm
from exp_curriculum import diversity as D

V = 61


def tiny(arch: str = "gpt2", **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_causal_lm(arch, vocab_size=V, d_model=16, n_layers=2, n_heads=2, max_seq_len=32, **extra)


def docs(n: int, seed: int = 0, lo: int = 3, hi: int = 14) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, V, rng.integers(lo, hi)).tolist() for _ in range(n)]


def brute_force_fisher(model, batch, micro_batch, targets):
    """Each micro-batch on its own: hand-written log-softmax NLL over the positions whose next token is
    real, .backward() on a fresh copy, squared gradients averaged over the micro-batches."""
    sq, n_mb = {}, 0
    for m, i in enumerate(range(0, len(batch["input_ids"]), micro_batch)):
        net = copy.deepcopy(model)
        ids, mask = batch["input_ids"][i:i + micro_batch], batch["attention_mask"][i:i + micro_batch]
        lp = torch.log_softmax(net(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        counted = mask[:, 1:].bool()
        tgt = targets[m]
        assert torch.equal(tgt == -100, ~counted)          # padding masked, nothing else
        nll = -lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[counted].mean()
        nll.backward()
        for name, p in net.named_parameters():            # tied tensors listed once
            sq[name] = sq.get(name, 0) + p.grad.double() ** 2
        n_mb += 1
    return {k: v / n_mb for k, v in sq.items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fisher_is_the_mean_of_per_micro_batch_squared_gradients(arch):
    model = tiny(arch).train()   # dropout 0: train mode is deterministic
    batch = D.make_batches(docs(12), n_batches=1, batch_size=6, seq_len=10, seed=1)[0]
    assert (batch["attention_mask"] == 0).any()              # some documents are padded
    params = D.embedded_parameters(model)
    fisher, targets = D.fisher_diagonal(model, batch, params, micro_batch=2,
                                        generator=torch.Generator().manual_seed(3))
    oracle = brute_force_fisher(model, batch, 2, targets)
    assert len(targets) == 3
    for name, f in fisher.items():
        # float32 gradients: relative to each tensor's scale
        torch.testing.assert_close(f.double(), oracle[name], rtol=1e-4, atol=1e-6 * float(oracle[name].max()))
    # a single squared gradient of the batch-mean loss (the old estimator) is a different quantity
    one, _ = D.fisher_diagonal(model, batch, params, micro_batch=6, targets=[torch.cat(targets)])
    total = float(sum(oracle[n].sum() for n in fisher))
    assert not np.isclose(float(sum(f.sum() for f in one.values())), total, rtol=1e-2)


def test_embedding_covers_weights_once_tied_head_under_the_input_embedding():
    model = tiny("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in D.embedded_parameters(model)]
    weights = [n for n, _ in model.named_parameters() if n.endswith("weight")]   # tied weight listed once
    assert sorted(names) == sorted(weights) and len(set(names)) == len(names)
    assert "transformer.wte.weight" in names and not any(n.startswith("lm_head") for n in names)
    assert "transformer.ln_f.weight" in names and not any(n.endswith(".bias") for n in names)
    with_bias = [n for n, _ in D.embedded_parameters(model, include_biases=True)]
    assert sorted(with_bias) == sorted(n for n, _ in model.named_parameters())
    emb = D.task2vec_embedding(model, torch.tensor(docs(4, lo=8, hi=9)), finetune_epochs=1, micro_batch=2)
    assert emb.shape == (sum(p.shape[0] for _, p in D.embedded_parameters(model)),)
    assert np.all(np.isfinite(emb)) and np.all(emb >= 0)

    untied = tiny("llama")                                   # Llama's default: its own head
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    names = [n for n, _ in D.embedded_parameters(untied)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert "model.norm.weight" in names


@pytest.mark.parametrize("untie", [False, True])
def test_finetuning_trains_only_the_head(untie):
    model = tiny("gpt2").train()
    if untie:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = D.as_batch(torch.tensor(docs(4, lo=9, hi=10)))
    loss = D.finetune_head(model, batch, micro_batch=2, epochs=2, lr=1e-2)
    assert np.isfinite(loss)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # tied: the head is the input embedding, the reference's setting; untied: the head alone
    assert changed == ({"lm_head.weight"} if untie else {"transformer.wte.weight"})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padding_does_not_change_a_documents_loss_or_fisher(arch):
    model = tiny(arch).eval()
    doc = docs(1, seed=5, lo=7, hi=8)[0]
    plain = D.as_batch(torch.tensor([doc]))
    padded = D.make_batches([doc], 1, 1, 12, pad_id=9)[0]
    assert padded["input_ids"].shape == (1, 12) and int(padded["attention_mask"].sum()) == 7

    def loss_and_grad(b):
        net = copy.deepcopy(model)
        loss = D.lm_loss(net(**b).logits, b["input_ids"], b["attention_mask"])
        loss.backward()
        return loss.detach(), [p.grad for p in net.parameters()]

    (l0, g0), (l1, g1) = loss_and_grad(plain), loss_and_grad(padded)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    params = D.embedded_parameters(model)
    f0, t0 = D.fisher_diagonal(model, plain, params, micro_batch=1)
    t_pad = torch.full((1, 11), -100)
    t_pad[:, :6] = t0[0]
    f1, _ = D.fisher_diagonal(model, padded, params, micro_batch=1, targets=[t_pad])
    for n in f0:
        torch.testing.assert_close(f1[n], f0[n], rtol=1e-4, atol=1e-12)
    # in a batch the loss is the token mean: the padded document adds its 6 positions, no more
    other = docs(1, seed=6, lo=12, hi=13)[0]
    both = D.make_batches([doc, other], 1, 2, 12, seed=0)[0]
    order = [doc, other] if int(both["attention_mask"][0].sum()) == 7 else [other, doc]
    sums = [D.lm_loss(model(**D.as_batch(torch.tensor([d]))).logits, torch.tensor([d]),
                      torch.ones(1, len(d), dtype=torch.long)) * (len(d) - 1) for d in order]
    torch.testing.assert_close(D.lm_loss(model(**both).logits, both["input_ids"], both["attention_mask"]),
                               sum(sums) / (6 + 11), rtol=1e-5, atol=1e-6)


def test_target_options_shift_and_padding():
    # position t puts (almost) all mass on token 10 + t: the draws reveal which position they came from
    t = 6
    logits = torch.full((1, t, V), -30.0)
    for i in range(t):
        logits[0, i, 10 + i] = 30.0
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    gen = torch.Generator().manual_seed(0)
    same = D.sample_fisher_targets(logits, mask, gen)
    shifted = D.sample_fisher_targets(logits, mask, gen, target_shift=True)
    with_pad = D.sample_fisher_targets(logits, mask, gen, fisher_on_padding=True)
    assert same.tolist() == [[10, 11, 12, -100, -100]]
    assert shifted.tolist() == [[11, 12, 13, -100, -100]]    # the reference: drawn one position later
    assert with_pad.tolist() == [[10, 11, 12, 13, 14]]       # the reference: padded positions count


def test_distance_and_spread_against_scipy():
    rng = np.random.default_rng(0)
    e0, e1 = rng.random(50), rng.random(50)
    a, b = e0 / (e0 + e1 + 1e-8), e1 / (e0 + e1 + 1e-8)
    assert D.task2vec_distance(e0, e1) == pytest.approx(1 - a @ b / np.sqrt((a @ a) * (b @ b)), rel=1e-12)
    assert D.task2vec_distance(e0, e0) == pytest.approx(0, abs=1e-12)
    d = rng.random(15)
    s = D.distance_stats(d)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert s["div_coeff"] == pytest.approx(d.mean())
    assert s["std"] == pytest.approx(np.sqrt(np.mean((d - d.mean()) ** 2)))   # the reference's np.std
    assert s["ci95"] == pytest.approx((hi - lo) / 2) and s["n_pairs"] == 15
    assert s["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(15))


def test_identical_batches_give_zero_and_diverse_batches_more():
    model = tiny("gpt2")
    kw = {"finetune_epochs": 1, "micro_batch": 2, "lr": 1e-3}
    rng = np.random.default_rng(0)
    one = torch.tensor(rng.integers(1, V, (4, 10)))
    same_seed = D.diversity_coefficient(model, [one] * 3, fresh_seed_per_batch=False, **kw)
    assert same_seed["div_coeff"] == 0 and same_seed["n_pairs"] == 3
    # with a fresh seed per batch identical batches differ only by the sampled targets: the noise floor
    floor = D.diversity_coefficient(model, [one] * 4, **kw)
    # diverse: each batch repeats a different narrow "language" (4 tokens of its own)
    diverse = [torch.tensor(rng.choice(np.arange(1 + 12 * k, 5 + 12 * k), (4, 10))) for k in range(4)]
    div = D.diversity_coefficient(model, diverse, **kw)
    assert 0 < floor["div_coeff"] < div["div_coeff"] <= 1
    # the reference get_diversity_coefficient's single seed draws the same batch every time
    ids = docs(30)
    assert all(torch.equal(b["input_ids"], D.make_batches(ids, 3, 4, 8, seed=2, fresh_seed_per_batch=False)[0]
                           ["input_ids"]) for b in D.make_batches(ids, 3, 4, 8, seed=2, fresh_seed_per_batch=False))
    fresh = D.make_batches(ids, 3, 4, 8, seed=2)
    assert not any(torch.equal(fresh[0]["input_ids"], b["input_ids"]) for b in fresh[1:])


def test_group_samples_cover_the_whole_language():
    # documents stored genre by genre, as the corpus is: the first 2,000 would be one genre only
    genres = np.repeat(["literature", "children", "encyclopedia", "drama"], [2835, 85, 1518, 615])
    assert set(genres[:2000]) == {"literature"}
    pick = D.sample_documents(genres, 2000, seed=0)
    assert len(pick) == len(set(pick)) == 2000
    counts = pd.Series(genres[pick]).value_counts()
    for g, n in pd.Series(genres).value_counts().items():
        p = n / len(genres)
        assert abs(counts.get(g, 0) - 2000 * p) < 4 * np.sqrt(2000 * p * (1 - p))   # proportional
    bal = pd.Series(genres[D.sample_documents(genres, 400, seed=0, how="balanced")]).value_counts()
    assert bal.to_dict() == {"literature": 105, "encyclopedia": 105, "drama": 105, "children": 85}
    assert np.array_equal(D.sample_documents(genres, 0), np.arange(len(genres)))


def test_stage_samples_every_genre_for_the_all_group(monkeypatch):
    from transformers import PreTrainedTokenizerFast

    import common.models
    from common.models import train_bpe_tokenizer
    from exp_curriculum import run
    from exp_curriculum.config import Config

    texts = {"web": "the market opened higher today", "children": "the little cat sat on a mat",
             "drama": "enter the king and his lords"}
    df = pd.DataFrame([{"text": f"{t} {i}", "language": "en", "genre": g}
                       for g, t in texts.items() for i in range(40)])
    tok: PreTrainedTokenizerFast = train_bpe_tokenizer(df["text"].tolist(), vocab_size=300)
    tok.pad_token = tok.eos_token = "<|endoftext|>"
    model = build_causal_lm("gpt2", vocab_size=len(tok), d_model=16, n_layers=1, n_heads=2, max_seq_len=32)
    monkeypatch.setattr(common.models, "load_causal_lm", lambda name: (model, tok))
    cfg = Config(threads=1)
    cfg.diversity.n_batches, cfg.diversity.batch_size, cfg.diversity.seq_len = 2, 4, 8
    cfg.diversity.micro_batch, cfg.diversity.finetune_epochs, cfg.diversity.max_docs = 2, 1, 30
    out = run.diversity_by_corpus(df, cfg)
    assert set(out) == {"en/web", "en/children", "en/drama", "en/all"}
    assert set(out["en/all"]["docs_per_genre"]) == set(texts) and out["en/all"]["n_docs"] == 30
    assert all(0 <= r["div_coeff"] <= 1 and r["n_pairs"] == 1 for r in out.values())
