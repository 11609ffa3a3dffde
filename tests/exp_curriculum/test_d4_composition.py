"""D4 composed as in Tirumala et al. 2023: MinHash survivors -> SemDeDup at a target ratio -> SSL prototypes.

Oracles: brute force written out from the definitions (SemDeDup's M_j = max similarity to an earlier item of
the cluster in farthest-first order; remove the largest M_j until the target fraction is gone; prototypes =
farthest from the centroid re-fitted on the survivors), with one cluster so that k-means is exact (the
centroid of a single cluster is the normalised mean); the previous fixed-eps SemDeDup for the eps option."""

from __future__ import annotations

import numpy as np
import pytest

from exp_curriculum import selection as S
from exp_curriculum.selection import d4, eps_for_removal, semdedup, semdedup_by_ratio


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_max_sim(x: np.ndarray, labels: np.ndarray, cent: np.ndarray) -> np.ndarray:
    """M_j by loops: inside each cluster, farthest from the centroid first (stable), max dot with earlier."""
    x = unit(x)
    m = np.full(len(x), -np.inf)
    for c in range(len(cent)):
        members = [int(i) for i in np.flatnonzero(labels == c)]
        members.sort(key=lambda i: -(1 - float(x[i] @ cent[c])))      # Python's sort is stable
        for pos, j in enumerate(members):
            for i in members[:pos]:
                m[j] = max(m[j], float(x[i] @ x[j]))
    return m


def one_cluster_centroid(x: np.ndarray) -> np.ndarray:
    v = unit(x).sum(0)
    return (v / np.linalg.norm(v))[None, :]


@pytest.mark.parametrize("remove", [0.1, 0.25, 0.5])
def test_target_ratio_is_reached_on_random_embeddings(remove):
    emb = np.random.default_rng(1).normal(size=(401, 24))
    keep, eps = semdedup_by_ratio(emb, n_clusters=6, remove_fraction=remove, seed=0)
    assert abs(int((~keep).sum()) - remove * len(emb)) <= 1
    # the chosen eps is an ordinary SemDeDup threshold: the fixed-eps rule at it gives the same mask
    assert np.array_equal(semdedup(emb, 6, eps, 0), keep)


def test_removed_items_brute_force_one_cluster():
    emb = np.random.default_rng(2).normal(size=(50, 6))
    keep, _ = semdedup_by_ratio(emb, n_clusters=1, remove_fraction=0.3, seed=0)
    m = brute_max_sim(emb, np.zeros(len(emb), int), one_cluster_centroid(emb))
    expected = set(np.argsort(-m)[: round(0.3 * len(emb))].tolist())   # random data: no ties
    assert set(np.flatnonzero(~keep).tolist()) == expected


def test_removed_items_brute_force_many_clusters():
    emb = np.random.default_rng(3).normal(size=(120, 8))
    cent, labels = S.spherical_kmeans(unit(emb), 5, seed=0)           # the clustering is shared; the rule is not
    m = brute_max_sim(emb, labels, cent)
    np.testing.assert_allclose(S.semdedup_max_similarity(emb, 5, 0), m, rtol=0, atol=1e-12)
    keep, _ = semdedup_by_ratio(emb, n_clusters=5, remove_fraction=0.2, seed=0)
    finite = np.flatnonzero(np.isfinite(m))
    expected = set(finite[np.argsort(-m[finite])][: round(0.2 * len(emb))].tolist())
    assert set(np.flatnonzero(~keep).tolist()) == expected
    assert keep[~np.isfinite(m)].all()                                 # the first of each cluster always stays


def test_eps_for_removal_edges():
    m = np.array([0.9, -np.inf, 0.5, 0.7, -np.inf])
    assert eps_for_removal(m, 0.0) == 0.0
    assert not (m > 1 - eps_for_removal(m, 0.0)).any()
    assert (m > 1 - eps_for_removal(m, 0.4)).sum() == 2                  # round(0.4 * 5) = 2
    assert (m > 1 - eps_for_removal(m, 1.0)).sum() == 3                  # only the finite ones can go
    with pytest.raises(ValueError):
        eps_for_removal(m, 1.5)


def test_fixed_eps_semdedup_unchanged():
    """The fixed-eps function (also called by study_stages.d4_rank) against the previous implementation."""
    def previous(emb, n_clusters, eps, seed):
        x = unit(emb)
        cent, labels = S.spherical_kmeans(x, n_clusters, seed=seed)
        keep = np.ones(len(x), dtype=bool)
        for c in range(len(cent)):
            idx = np.flatnonzero(labels == c)
            if len(idx) < 2:
                continue
            idx = idx[np.argsort(-(1 - x[idx] @ cent[c]), kind="stable")]
            sim = np.triu(x[idx] @ x[idx].T, k=1)
            keep[idx[sim.max(axis=0) > 1 - eps]] = False
        return keep

    emb = np.random.default_rng(4).normal(size=(200, 4))
    for eps in (0.01, 0.05, 0.2):
        assert np.array_equal(semdedup(emb, 7, eps, 0), previous(emb, 7, eps, 0))


def test_minhash_removed_document_never_enters_semdedup():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(80, 10))
    mh = np.ones(len(emb), dtype=bool)
    gone = np.arange(0, 80, 4)
    mh[gone] = False
    # the MinHash-removed rows copy survivors: if they entered SemDeDup they would remove those survivors
    emb[gone] = emb[gone + 1]
    res = d4(emb, 4, keep_fraction=0.5, seed=0, minhash_keep=mh, dedup_remove=0.25)
    alone = d4(emb[mh], 4, keep_fraction=0.5, seed=0, dedup_remove=0.25)
    assert np.array_equal(res.semdedup_keep[mh], alone.semdedup_keep) and res.eps == alone.eps
    assert np.array_equal(res.keep[mh], alone.keep)
    assert not res.keep[gone].any() and not res.semdedup_keep[gone].any()
    # whatever the removed rows hold, nothing changes
    emb2 = emb.copy()
    emb2[gone] = rng.normal(size=(len(gone), 10))
    res2 = d4(emb2, 4, keep_fraction=0.5, seed=0, minhash_keep=mh, dedup_remove=0.25)
    assert np.array_equal(res2.keep, res.keep) and np.array_equal(res2.semdedup_keep, res.semdedup_keep)


def test_d4_brute_force_one_cluster():
    """MinHash mask -> SemDeDup removing 20 % of the survivors -> keep 40 % of the survivors, farthest from
    the centroid re-fitted on the SemDeDup survivors."""
    rng = np.random.default_rng(6)
    emb = rng.normal(size=(60, 5))
    mh = rng.random(60) > 0.2
    base = np.flatnonzero(mh)
    m = brute_max_sim(emb[base], np.zeros(len(base), int), one_cluster_centroid(emb[base]))
    n_rm = round(0.2 * len(base))
    surv = np.sort(base[np.argsort(-m)[n_rm:]])
    c = one_cluster_centroid(emb[surv])[0]
    far = 1 - unit(emb[surv]) @ c
    expected = set(surv[np.argsort(-far)][: round(0.4 * len(base))].tolist())
    res = d4(emb, 1, keep_fraction=0.4, seed=0, minhash_keep=mh, dedup_remove=0.2)
    assert set(np.flatnonzero(res.semdedup_keep).tolist()) == set(surv.tolist())
    assert set(np.flatnonzero(res.keep).tolist()) == expected


def test_d4_fixed_eps_option_and_d4_select():
    emb = np.random.default_rng(7).normal(size=(90, 3))
    res = d4(emb, 4, keep_fraction=0.3, seed=0, eps=0.02)
    assert np.array_equal(res.semdedup_keep, semdedup(emb, 4, 0.02, 0)) and res.eps == 0.02
    assert np.array_equal(S.d4_select(emb, 4, 0.02, 0.3, 0), res.keep)
    assert res.keep.sum() == min(round(0.3 * 90), res.semdedup_keep.sum())
    with pytest.raises(ValueError):
        d4(emb, 4, 0.3, 0)                                  # neither a ratio nor an eps


def test_dedup_stage_feeds_only_minhash_survivors(monkeypatch):
    """run.semantic_dedup with the encoder replaced by fixed vectors: the MinHash mask reaches D4."""
    import common.models
    from exp_curriculum import run
    from exp_curriculum.config import Config

    rng = np.random.default_rng(8)
    texts = [f"document {i}" for i in range(40)]
    vecs = {t: rng.normal(size=6) for t in texts}
    monkeypatch.setattr(common.models, "load_encoder", lambda name: (None, None))
    monkeypatch.setattr(common.models, "encode_texts",
                        lambda model, tok, ts, max_length=128: _Tensor(np.array([vecs[t] for t in ts])))
    cfg = Config(threads=1)
    cfg.semdedup.max_docs, cfg.semdedup.n_clusters = 0, 3
    mh = np.ones(40, dtype=bool)
    mh[[3, 17, 29]] = False
    sem = run.semantic_dedup(texts, cfg, mh)
    idx = sem["idx"]
    assert np.array_equal(sem["minhash_keep"], mh[idx])
    assert not sem["d4"][~mh[idx]].any() and not sem["semdedup"][~mh[idx]].any()
    s = cfg.semdedup
    direct = d4(sem["emb"], s.n_clusters, s.d4_keep_fraction, cfg.seed, minhash_keep=mh[idx],
                dedup_remove=1 - s.d4_dedup_keep)
    assert np.array_equal(sem["d4"], direct.keep) and sem["d4_eps"] == direct.eps
    n_surv = int(mh.sum())
    assert abs(n_surv - int(sem["d4_semdedup"].sum()) - (1 - s.d4_dedup_keep) * n_surv) <= 1


class _Tensor:
    """What encode_texts returns, as far as semantic_dedup uses it (.numpy())."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    def numpy(self) -> np.ndarray:
        return self._a
