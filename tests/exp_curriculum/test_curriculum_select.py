"""exp_curriculum selection: MinHash-LSH against datasketch, SemDeDup on planted paraphrases."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import default_data_dir
from exp_curriculum import selection as S

DATA = default_data_dir()
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "text").is_dir(), reason="shared data not present")


@pytest.fixture(scope="module")
def texts_with_dups():
    from exp_curriculum.corpus import load_corpus

    ds = load_corpus(DATA)
    rng = np.random.default_rng(0)
    long_ = np.flatnonzero(np.asarray(ds["n_chars"]) >= 1500)
    base = [ds[int(i)]["text"] for i in rng.choice(long_, 300, replace=False)]
    # planted near-duplicates (one word changed in a >= 1,500-character document) and an exact copy
    edits = [t.replace(" ", " xyzzy ", 1) for t in base[:30]]
    return base + edits + [base[40]]


def test_optimal_bands_match_datasketch():
    from datasketch.lsh import _optimal_param

    for thr, k in ((0.8, 128), (0.9, 128), (0.5, 64)):
        assert S.optimal_bands(thr, k) == _optimal_param(thr, k, 0.5, 0.5)


@needs_data
def test_minhash_bit_identical_and_same_lsh_pairs_as_datasketch(texts_with_dups):
    from datasketch import MinHash, MinHashLSH

    cfg = S.MinHashConfig(num_perm=128, threshold=0.8, ngram=5)
    sig = S.minhash_signatures(texts_with_dups, cfg)
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    mhs = []
    for i, t in enumerate(texts_with_dups):
        m = MinHash(num_perm=128, seed=1)
        m.update_batch(S.shingles(t, 5))
        mhs.append(m)
        lsh.insert(i, m)
    assert all(np.array_equal(sig[i], m.hashvalues) for i, m in enumerate(mhs))
    ref = {(min(i, j), max(i, j)) for i, m in enumerate(mhs) for j in lsh.query(m) if j != i}
    b, r = S.optimal_bands(0.8, 128)
    assert S.lsh_candidate_pairs(sig, b, r) == ref
    assert {(i, 300 + i) for i in range(30)} <= ref | {(40, 330)}


@needs_data
def test_compiled_minhash_matches_numpy(texts_with_dups):
    texts = texts_with_dups[:40] + ["", "one", "a b c d", "a b c d e", "𝔘𝔫𝔦 code 😀 x y z", "!!!", "nul\x00inside"]
    for hashing in ("sha1", "fast"):
        cfg = S.MinHashConfig(num_perm=64, ngram=5, hashing=hashing)
        a, b = S.permutations(cfg.num_perm, cfg.seed)
        clean = [t.replace("\x00", " ") for t in texts]
        assert np.array_equal(S._signatures_numba(clean, cfg, a, b), S._signatures_numpy(clean, cfg, a, b, 1 << 13))
        assert np.array_equal(S.minhash_signatures(texts, cfg)[-1], S.minhash_signatures(clean[-1:], cfg)[0])


@needs_data
def test_fast_hashing_agrees_with_datasketch_up_to_estimator_error(texts_with_dups):
    cfg = S.MinHashConfig(num_perm=256, threshold=0.8, ngram=5, hashing="fast")
    keep, labels = S.minhash_dedup(texts_with_dups, cfg)
    planted = {(i, 300 + i) for i in range(30)} | {(40, 330)}
    # true Jaccard of the planted pairs is >= ~0.9, far above the threshold: all must be found
    assert all(labels[i] == labels[j] for i, j in planted)
    assert keep.sum() == len(texts_with_dups) - len({j for _, j in planted})
    sig = S.minhash_signatures(texts_with_dups, cfg)
    for i, j in list(planted)[:10]:
        a, b = set(S.shingles(texts_with_dups[i], 5)), set(S.shingles(texts_with_dups[j], 5))
        true = len(a & b) / len(a | b)
        assert abs(S.estimated_jaccard(sig, i, j) - true) < 4 / np.sqrt(256)   # ~4 sigma of the estimator


def test_semdedup_removes_paraphrases_keeps_distinct():
    from common.models import encode_texts, load_encoder

    try:
        model, tok = load_encoder("all-minilm-l6-v2")
    except Exception as exc:  # offline package missing
        pytest.skip(f"encoder not available: {exc}")
    distinct = ["The stock market fell sharply after the central bank raised interest rates.",
                "A recipe for bread needs flour, water, salt and yeast.",
                "The goalkeeper saved a penalty in the final minute of the match.",
                "Le chat dort au soleil sur le rebord de la fenêtre.",
                "Photosynthesis converts light energy into chemical energy in plants.",
                "The novel follows a young sailor lost at sea for many months."]
    paraphrases = ["Stocks dropped steeply when the central bank increased interest rates.",
                   "In the last minute of the game the goalkeeper stopped a penalty kick."]
    emb = encode_texts(model, tok, distinct + paraphrases).numpy()
    keep = S.semdedup(emb, n_clusters=3, eps=0.2, seed=0)
    # each planted pair loses exactly one member; every distinct text survives
    assert keep[[1, 3, 4, 5]].all()
    assert keep[[0, 6]].sum() == 1 and keep[[2, 7]].sum() == 1
    d4 = S.d4_select(emb, n_clusters=3, eps=0.2, keep_fraction=0.5, seed=0)
    assert d4.sum() == 4 and not (d4 & ~keep).any()


def test_lsh_clusters_linear_on_many_copies_and_equal_to_brute_force():
    import time

    import networkx as nx

    text = "the quick brown fox jumps over the lazy dog near the quiet river bank today " * 3
    for verify in S.VERIFY_MODES:   # HEAD: 2 M candidate pairs, ~45 s
        t0 = time.perf_counter()
        keep, labels = S.minhash_dedup([text] * 2000, S.MinHashConfig(), verify=verify, log=lambda *_: None)
        assert time.perf_counter() - t0 < 5 and keep.sum() == 1 and (labels == 0).all()
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, bands, rows = int(rng.integers(2, 80)), int(rng.integers(1, 5)), int(rng.integers(1, 3))
        sig = rng.integers(0, 3, (n, bands * rows)).astype(np.uint32)
        thr = float(rng.uniform(0.2, 0.9))
        same = (lambda i, j, sig=sig, thr=thr: S.estimated_jaccard(sig, i, j) >= thr) if trial % 2 else None
        g = nx.Graph()
        g.add_nodes_from(range(n))
        for i in range(n):       # brute force over every pair and band
            for j in range(i + 1, n):
                if any((sig[i, k * rows:(k + 1) * rows] == sig[j, k * rows:(k + 1) * rows]).all()
                       for k in range(bands)) and (same is None or same(i, j)):
                    g.add_edge(i, j)
        oracle = np.empty(n, dtype=np.int64)
        for comp in nx.connected_components(g):
            oracle[list(comp)] = min(comp)
        groups = S._row_groups(sig) if same is not None else None
        assert np.array_equal(S.lsh_clusters(sig, bands, rows, same=same, groups=groups), oracle)
