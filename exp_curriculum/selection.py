"""(Named selection.py, not select.py: a script run from this folder would shadow the stdlib `select`.)

Near-duplicate detection and selection: MinHash-LSH (vectorised numpy) and SemDeDup.

MinHash reproduces datasketch 2.0.0's default "affine32" scheme bit for bit: 32-bit SHA-1 hash of each
shingle, MurmurHash3 fmix32 pre-mix, permutations h -> a*h + b mod 2^32 with (a, b) drawn from
``np.random.RandomState(seed)`` exactly as datasketch draws them. With numba installed, compiled kernels
apply the permutations (and, for ``hashing: fast``, hash the words and n-grams too) in one pass without
intermediate arrays; otherwise the numpy version hashes every document's shingles at once and takes
per-document minima with ``np.minimum.reduceat``. Both give identical signatures (tested).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.integrate import quad

from exp_curriculum.metrics import USE_NUMBA, clean_text, njit

VERIFY_MODES = ("jaccard", "estimate", "none")
_FMIX32 = (16, np.uint32(0x85EBCA6B), 13, np.uint32(0xC2B2AE35), 16)
MAX32 = np.uint32(0xFFFFFFFF)


@dataclass
class MinHashConfig:
    num_perm: int = 128
    threshold: float = 0.8
    ngram: int = 5                 # word n-gram shingles
    seed: int = 1                  # datasketch's default seed
    hashing: str = "sha1"          # "sha1": bit-identical to datasketch; "fast": vectorised word-hash shingles
    fp_weight: float = 0.5
    fn_weight: float = 0.5
    # which LSH candidate pairs count as duplicates: "jaccard" = true Jaccard of the word n-gram sets >=
    # threshold, "estimate" = MinHash estimate >= threshold, "none" = every candidate pair
    verify: str = "jaccard"

    def validate(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"minhash.threshold must be in (0, 1), got {self.threshold}")
        if self.hashing not in ("sha1", "fast"):
            raise ValueError(f"minhash.hashing must be 'sha1' or 'fast', got '{self.hashing}'")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"minhash.verify must be one of {', '.join(VERIFY_MODES)}, got '{self.verify}'")
        if self.num_perm < 2 or self.ngram < 1:
            raise ValueError("minhash.num_perm must be >= 2 and minhash.ngram >= 1")


def shingles(text: str, n: int) -> list[bytes]:
    """Distinct word n-grams of the lower-cased text (words = \\w+ runs), UTF-8 encoded (lone surrogates
    replaced first, see `metrics.clean_text`)."""
    words = re.findall(r"\w+", clean_text(text).lower())
    if len(words) < n:
        return [" ".join(words).encode()] if words else []
    return list({" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)})


def sha1_hash32(data: bytes) -> int:
    return int.from_bytes(hashlib.sha1(data).digest()[:4], "little")


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch 2.0.0 affine32 parameters: odd a, any b, both uint32."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2, s3 = _FMIX32
    h = h ^ (h >> np.uint32(s1))
    h = h * m1
    h = h ^ (h >> np.uint32(s2))
    h = h * m2
    return h ^ (h >> np.uint32(s3))


_P = 0x01000193                       # FNV prime


@lru_cache(maxsize=1)
def _word_char_table() -> np.ndarray:
    """Which Basic-Multilingual-Plane code points `re`'s \\w matches (code points above count as word)."""
    w = re.compile(r"\w")
    return np.array([w.match(chr(i)) is not None for i in range(1 << 16)], dtype=bool)


def fast_shingle_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, per-document counts) of the word n-grams of every text, with no Python loop over words.

    The corpus is lower-cased and joined with NUL separators into one code-point array; a word's hash is
    the wrap-around sum of fmix32(code point ^ golden * offset-in-word) over its characters (one
    np.add.reduceat), n-gram hashes combine n word hashes FNV-style, then fmix32. Not bit-identical to
    datasketch's SHA-1 hashes, but an equally valid hash family for the estimator. Documents with fewer
    than n words get one shingle of all their words, like `shingles`."""
    cp = np.frombuffer("\x00".join(texts).lower().encode("utf-32-le"), dtype=np.uint32)
    isw = np.where(cp < (1 << 16), _word_char_table()[np.minimum(cp, (1 << 16) - 1)], True) & (cp != 0)
    doc_of_char = np.cumsum(cp == 0)
    edges = np.diff(isw.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    s = np.flatnonzero(edges == 1)
    idx = np.flatnonzero(isw)
    first = np.searchsorted(idx, s)                       # position of each word's first char in idx
    offset = idx - np.repeat(s, np.diff(np.append(first, len(idx))))
    mixed = fmix32(cp[idx] ^ (offset.astype(np.uint32) * np.uint32(0x9E3779B1)))
    hw = fmix32(np.add.reduceat(mixed, first, dtype=np.uint32)) if len(s) else np.zeros(0, np.uint32)
    wdoc = doc_of_char[s]
    nwords = np.bincount(wdoc, minlength=len(texts))
    m = max(len(hw) - n + 1, 0)
    acc = np.full(m, np.uint32(0x811C9DC5), dtype=np.uint32)
    for k in range(n):
        acc = (acc * np.uint32(_P)) ^ hw[k:k + m]
    valid = wdoc[:m] == wdoc[n - 1:n - 1 + m]
    hashes, docs = [acc[valid]], [wdoc[:m][valid]]
    for d in np.flatnonzero((nwords > 0) & (nwords < n)):   # short documents: one shingle
        h = np.full(1, 0x811C9DC5, dtype=np.uint32)
        for x in hw[wdoc == d]:
            h = (h * np.uint32(_P)) ^ x
        hashes.append(h)
        docs.append(np.array([d]))
    hashes, docs = np.concatenate(hashes), np.concatenate(docs)
    order = np.argsort(docs, kind="stable")
    return fmix32(hashes[order]), np.bincount(docs, minlength=len(texts)).astype(np.int64)


def _flat_hashes(texts: list[str], cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    if cfg.hashing == "fast":
        return fast_shingle_hashes(texts, cfg.ngram)
    shs = [shingles(t, cfg.ngram) for t in texts]
    lengths = np.array([len(s) for s in shs], dtype=np.int64)
    flat = np.fromiter((sha1_hash32(x) for s in shs for x in s), dtype=np.uint32, count=int(lengths.sum()))
    return fmix32(flat), lengths


def minhash_signatures(texts: list[str], cfg: MinHashConfig, chunk: int = 1 << 13) -> np.ndarray:
    """(n_docs, num_perm) uint32 signatures; a document without words gets the all-max signature.
    Compiled kernels when numba is installed, else the numpy version (same values, tested)."""
    texts = [clean_text(t).replace("\x00", " ") for t in texts]  # NUL separates documents
    a, b = permutations(cfg.num_perm, cfg.seed)
    if USE_NUMBA:
        return _signatures_numba(texts, cfg, a, b)
    return _signatures_numpy(texts, cfg, a, b, chunk)


def _signatures_numpy(texts: list[str], cfg: MinHashConfig, a: np.ndarray, b: np.ndarray, chunk: int,
                      ) -> np.ndarray:
    flat, lengths = _flat_hashes(texts, cfg)
    sig = np.full((len(texts), cfg.num_perm), MAX32, dtype=np.uint32)
    nonempty = np.flatnonzero(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    # process whole documents in chunks of about `chunk` shingles so memory stays bounded
    i = 0
    while i < len(nonempty):
        j, total = i, 0
        while j < len(nonempty) and (total == 0 or total + lengths[nonempty[j]] <= chunk):
            total += lengths[nonempty[j]]
            j += 1
        docs = nonempty[i:j]
        lo, hi = starts[docs[0]], starts[docs[-1]] + lengths[docs[-1]]
        # (num_perm, shingles) layout: reduceat along the contiguous axis is ~10x faster than along axis 0
        phv = np.multiply(a[:, None], flat[None, lo:hi])       # uint32 wraparound = mod 2^32
        np.add(phv, b[:, None], out=phv)
        sig[docs] = np.minimum.reduceat(phv, starts[docs] - lo, axis=1).T
        i = j
    return sig


# ---------------------------------------------------------------- compiled MinHash (numba)
# uint64 arithmetic masked to 32 bits gives exactly numpy's uint32 wrap-around; every constant is a uint64 so
# numba never mixes signed and unsigned integers (which it would promote to float).
_M32 = np.uint64(0xFFFFFFFF)
_C1, _C2 = np.uint64(0x85EBCA6B), np.uint64(0xC2B2AE35)
_GOLDEN, _FNV_P, _FNV_0 = np.uint64(0x9E3779B1), np.uint64(_P), np.uint64(0x811C9DC5)
_S16, _S13 = np.uint64(16), np.uint64(13)


@njit
def _fmix32_scalar(h: np.uint64) -> np.uint64:
    h ^= h >> _S16
    h = (h * _C1) & _M32
    h ^= h >> _S13
    h = (h * _C2) & _M32
    return h ^ (h >> _S16)


@njit
def _permute_min(h: np.uint64, a: np.ndarray, b: np.ndarray, row: np.ndarray) -> None:
    """row[p] = min(row[p], (a[p] * h + b[p]) mod 2^32): one shingle into one signature."""
    for p in range(len(a)):
        v = (a[p] * h + b[p]) & _M32
        if v < row[p]:
            row[p] = v


@njit
def _signatures_kernel(flat: np.ndarray, lengths: np.ndarray, a: np.ndarray, b: np.ndarray,
                       sig: np.ndarray) -> None:
    """Signatures from already-mixed shingle hashes, documents stored one after the other in `flat`."""
    pos = 0
    for d in range(len(lengths)):
        for k in range(pos, pos + lengths[d]):
            _permute_min(np.uint64(flat[k]), a, b, sig[d])
        pos += lengths[d]


@njit
def _fold_words(ring: np.ndarray, first: int, count: int, n: int) -> np.uint64:
    """FNV-style combination of `count` consecutive word hashes of the ring buffer, then fmix32."""
    acc = _FNV_0
    for k in range(count):
        acc = ((acc * _FNV_P) & _M32) ^ ring[(first + k) % n]
    return _fmix32_scalar(acc)


@njit
def _fast_signatures_kernel(cp: np.ndarray, is_word: np.ndarray, n: int, a: np.ndarray, b: np.ndarray,
                            sig: np.ndarray) -> None:
    """`fast_shingle_hashes` followed by the permutations, fused: one pass over the NUL-separated code
    points, no intermediate arrays. Word hashes of the last n words sit in a ring buffer."""
    ring = np.zeros(n, dtype=np.uint64)
    doc, n_words, word_sum, offset = 0, 0, np.uint64(0), np.uint64(0)
    in_word = False
    for k in range(len(cp) + 1):
        c = cp[k] if k < len(cp) else 0
        w = c != 0 and (c >= 65536 or is_word[c])
        if w:
            word_sum = (word_sum + _fmix32_scalar(np.uint64(c) ^ ((offset * _GOLDEN) & _M32))) & _M32
            offset += np.uint64(1)
            in_word = True
            continue
        if in_word:  # a word just ended
            ring[n_words % n] = _fmix32_scalar(word_sum)
            n_words += 1
            if n_words >= n:
                _permute_min(_fold_words(ring, n_words - n, n, n), a, b, sig[doc])
            word_sum, offset, in_word = np.uint64(0), np.uint64(0), False
        if c == 0:  # end of a document
            if 0 < n_words < n:  # short document: one shingle of all its words
                _permute_min(_fold_words(ring, 0, n_words, n), a, b, sig[doc])
            doc += 1
            n_words = 0


def _signatures_numba(texts: list[str], cfg: MinHashConfig, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sig = np.full((len(texts), cfg.num_perm), 0xFFFFFFFF, dtype=np.uint64)
    a64, b64 = a.astype(np.uint64), b.astype(np.uint64)
    if cfg.hashing == "fast":
        cp = np.frombuffer("\x00".join(texts).lower().encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        _fast_signatures_kernel(cp, _word_char_table(), cfg.ngram, a64, b64, sig)
    else:
        flat, lengths = _flat_hashes(texts, cfg)
        _signatures_kernel(flat, lengths, a64, b64, sig)
    return sig.astype(np.uint32)


@lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5,
                  ) -> tuple[int, int]:
    """(b, r) minimising fp_weight * FP area + fn_weight * FN area under P(s) = 1 - (1 - s^r)^b
    (datasketch's `_optimal_param`, same scipy quadrature)."""
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = quad(lambda s, b=b, r=r: 1 - (1 - s ** r) ** b, 0.0, threshold)[0]
            fn = quad(lambda s, b=b, r=r: (1 - s ** r) ** b, threshold, 1.0)[0]
            err = fp * fp_weight + fn * fn_weight
            if err < best:
                best, opt = err, (b, r)
    return opt


def _band_buckets(sig: np.ndarray, band: int, rows: int) -> np.ndarray:
    """Bucket id of every document in one band (documents agreeing on the band's `rows` values share it)."""
    block = np.ascontiguousarray(sig[:, band * rows:(band + 1) * rows])
    keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()
    return np.unique(keys, return_inverse=True)[1].ravel()


def _row_groups(sig: np.ndarray) -> np.ndarray:
    """Group id per document: equal ids <=> identical full signatures."""
    sig = np.ascontiguousarray(sig)
    keys = sig.view(np.dtype((np.void, sig.dtype.itemsize * sig.shape[1]))).ravel()
    return np.unique(keys, return_inverse=True)[1].ravel()


def lsh_candidate_pairs(sig: np.ndarray, bands: int, rows: int) -> set[tuple[int, int]]:
    """Pairs (i < j) whose signatures agree on all `rows` values of at least one band. Quadratic in a bucket's
    size (2,000 copies of one text are 2 M pairs): for checks against datasketch; `lsh_clusters` is linear."""
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        inverse = _band_buckets(sig, band, rows)
        counts = np.bincount(inverse)
        for g in np.flatnonzero(counts > 1):
            members = np.flatnonzero(inverse == g)
            pairs.update((int(x), int(y)) for k, x in enumerate(members) for y in members[k + 1:])
    return pairs


def _smallest_member_labels(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the graph on n nodes with edges (a[k], b[k]); label = smallest node index."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    comp = connected_components(graph, directed=False)[1]
    first = np.full(comp.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    return first[comp]


def lsh_clusters(sig: np.ndarray, bands: int, rows: int, same=None, groups: np.ndarray | None = None,
                 ) -> np.ndarray:
    """Cluster label (smallest member index) of every document: the connected components of the graph whose
    edges are the LSH candidate pairs (same bucket in at least one band) that `same(i, j)` accepts.

    `same=None` accepts every pair: each document is joined to the first member of each of its buckets
    (one edge per document and band, then scipy's connected components): linear, never builds the pairs.
    With `same`, `groups` (equal id => `same` holds between the two documents and they compare equally
    with every third one, e.g. identical signatures or identical shingle sets) merges the members of a
    group directly; within a bucket only one member per group is compared, pairs already connected are
    skipped and a rejected pair is never tested twice. None of that changes the components (tested
    against brute force); 2,000 copies of one text cost one group, not 2 M comparisons."""
    n = len(sig)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    buckets = [_band_buckets(sig, band, rows) for band in range(bands)]
    if same is None:
        a, b = [], []
        for inv in buckets:
            first = np.full(inv.max() + 1, n, dtype=np.int64)
            np.minimum.at(first, inv, np.arange(n))
            a.append(np.arange(n))
            b.append(first[inv])
        return _smallest_member_labels(n, np.concatenate(a), np.concatenate(b))
    if groups is None:
        groups = np.arange(n)
    _, first, inv = np.unique(groups, return_index=True, return_inverse=True)
    labels = _smallest_member_labels(n, np.arange(n), first[inv.ravel()])
    parent = labels.tolist()          # union-find over the group-merged start

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    rejected: set[tuple[int, int]] = set()
    for inv in buckets:
        order = np.argsort(inv, kind="stable")
        cuts = np.flatnonzero(np.diff(inv[order])) + 1
        for members in np.split(order, cuts):
            if len(members) < 2:
                continue
            # one representative (the first) per group inside the bucket
            reps = members[np.unique(groups[members], return_index=True)[1]].tolist()
            if len(reps) < 2:
                continue
            for k, x in enumerate(reps):
                for y in reps[k + 1:]:
                    rx, ry = find(x), find(y)
                    if rx == ry or (x, y) in rejected:
                        continue
                    if same(x, y):
                        parent[max(rx, ry)] = min(rx, ry)
                    else:
                        rejected.add((x, y))
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def estimated_jaccard(sig: np.ndarray, i: int, j: int) -> float:
    return float(np.mean(sig[i] == sig[j]))


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a & b| / |a | b|; two empty sets (documents without words) are identical: 1."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def minhash_dedup(texts: list[str], cfg: MinHashConfig, verify: str | None = None, log=print,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(keep-mask, cluster label per document): the smallest index of each duplicate cluster is kept.

    Clusters are connected components of the LSH candidate pairs accepted by `verify` (default
    `cfg.verify`): "jaccard" = true Jaccard of the `shingles` sets >= threshold (shingled only for documents
    that share a bucket), "estimate" = MinHash estimate >= threshold, "none" = all candidates."""
    import time

    verify = cfg.verify if verify is None else verify
    if verify not in VERIFY_MODES:
        raise ValueError(f"minhash verify must be one of {', '.join(VERIFY_MODES)}, got '{verify}'")
    t0 = time.perf_counter()
    sig = minhash_signatures(texts, cfg)
    b, r = optimal_bands(cfg.threshold, cfg.num_perm, cfg.fp_weight, cfg.fn_weight)
    log(f"minhash: {len(texts)} signatures ({cfg.hashing}, {cfg.num_perm} permutations) in "
        f"{time.perf_counter() - t0:.1f} s; LSH {b} bands x {r} rows, verify={verify}")
    if verify == "none":
        labels = lsh_clusters(sig, b, r)
    elif verify == "estimate":
        labels = lsh_clusters(sig, b, r, same=lambda i, j: estimated_jaccard(sig, i, j) >= cfg.threshold,
                              groups=_row_groups(sig))
    else:
        # shingle sets only of documents that share a bucket with another one
        in_bucket = np.zeros(len(texts), dtype=bool)
        for band in range(b):
            inv = _band_buckets(sig, band, r)
            in_bucket |= np.bincount(inv)[inv] > 1
        sets: dict[int, frozenset] = {int(i): frozenset(shingles(texts[i], cfg.ngram))
                                      for i in np.flatnonzero(in_bucket)}
        ids: dict[frozenset, int] = {}
        groups = np.array([ids.setdefault(sets[i], len(ids)) if i in sets else -1 - i for i in range(len(texts))])
        labels = lsh_clusters(sig, b, r, same=lambda i, j: jaccard(sets[i], sets[j]) >= cfg.threshold,
                              groups=groups)
    keep = labels == np.arange(len(texts))
    log(f"minhash: {int((~keep).sum())} of {len(texts)} documents removed in {time.perf_counter() - t0:.1f} s")
    return keep, labels


# ---------------------------------------------------------------- SemDeDup / SSL prototypes / D4

def spherical_kmeans(x: np.ndarray, k: int, n_iter: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (cosine) on L2-normalised rows: (centroids (k, d), labels). k-means++ init."""
    rng = np.random.default_rng(seed)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    k = min(k, len(x))
    cent = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = 1 - np.max(x @ np.array(cent).T, axis=1)
        d = np.clip(d, 0, None) ** 2
        cent.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
    c = np.array(cent)
    labels = np.zeros(len(x), dtype=np.int64)
    for it in range(n_iter):
        new = np.argmax(x @ c.T, axis=1)
        if it and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            m = labels == j
            if m.any():
                v = x[m].sum(0)
                c[j] = v / max(np.linalg.norm(v), 1e-12)
    return c, labels


def semdedup_max_similarity(emb: np.ndarray, n_clusters: int, seed: int = 0, keep_hard: bool = True,
                            ) -> np.ndarray:
    """M_j of SemDeDup (facebookresearch/SemDeDup): inside each spherical k-means cluster, sorted by distance
    to the centroid (farthest first with keep_hard), the max cosine similarity of item j to any earlier item
    of its cluster; -inf for the first item of a cluster (it is never removed)."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    max_sim = np.full(len(x), -np.inf)
    if len(x) == 0:          # e.g. a sample without MinHash survivors
        return max_sim
    cent, labels = spherical_kmeans(x, n_clusters, seed=seed)
    for c in range(len(cent)):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        dist = 1 - x[idx] @ cent[c]
        idx = idx[np.argsort(-dist if keep_hard else dist, kind="stable")]
        sim = x[idx] @ x[idx].T
        sim[np.tril_indices(len(idx))] = -np.inf        # keep sim[i, j] for i < j only
        max_sim[idx] = sim.max(axis=0)
    return max_sim


def semdedup(emb: np.ndarray, n_clusters: int, eps: float, seed: int = 0, keep_hard: bool = True,
             ) -> np.ndarray:
    """SemDeDup keep-mask with a fixed eps (facebookresearch/SemDeDup rule): remove item j when its
    `semdedup_max_similarity` exceeds 1 - eps. Larger eps removes more (the code's semantics, not the
    README's)."""
    return ~(semdedup_max_similarity(emb, n_clusters, seed, keep_hard) > 1 - eps)


def eps_for_removal(max_sim: np.ndarray, remove_fraction: float) -> float:
    """The eps at which the SemDeDup rule (remove when M_j > 1 - eps) removes round(remove_fraction * n)
    items: 1 - the midpoint between the last removed and the first kept M_j in descending order, so the
    fixed-eps rule at the returned eps gives the same mask. Ties at the boundary are all kept (the removed
    count is then below the target); at most the items with a finite M_j (not first in their cluster) can
    go. eps = 0 when nothing is to go; above 1 when every removable item goes."""
    if not 0 <= remove_fraction <= 1:
        raise ValueError(f"remove_fraction must be in [0, 1], got {remove_fraction}")
    m = np.sort(max_sim[np.isfinite(max_sim)])[::-1]
    k = min(int(round(remove_fraction * len(max_sim))), len(m))
    if k == 0:
        return 0.0
    below = m[k] if k < len(m) else m[-1] - 1.0       # the first kept value (or one below every value)
    return float(1 - (m[k - 1] + below) / 2)


def semdedup_by_ratio(emb: np.ndarray, n_clusters: int, remove_fraction: float, seed: int = 0,
                      keep_hard: bool = True) -> tuple[np.ndarray, float]:
    """SemDeDup removing a target fraction of the items (D4's R_dedup = 1 - remove_fraction is the fraction
    kept): (keep-mask, the eps chosen by `eps_for_removal`). `semdedup(emb, n_clusters, eps, seed)` at that
    eps returns the same mask."""
    max_sim = semdedup_max_similarity(emb, n_clusters, seed, keep_hard)
    eps = eps_for_removal(max_sim, remove_fraction)
    return ~(max_sim > 1 - eps), eps


def prototype_scores(emb: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """SSL-prototype difficulty: cosine distance to the nearest k-means centroid (higher = harder)."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    cent, _ = spherical_kmeans(x, n_clusters, seed=seed)
    return 1 - np.max(x @ cent.T, axis=1)


@dataclass
class D4Result:
    keep: np.ndarray            # D4's selection over all rows
    semdedup_keep: np.ndarray   # after MinHash and SemDeDup (before the prototype step), over all rows
    eps: float                  # SemDeDup's eps (chosen for the target ratio, or the fixed one)


def d4(emb: np.ndarray, n_clusters: int, keep_fraction: float, seed: int = 0, *,
       minhash_keep: np.ndarray | None = None, dedup_remove: float | None = None, eps: float | None = None,
       ) -> D4Result:
    """D4 (Tirumala et al. 2023) composed as in the paper: MinHash survivors (`minhash_keep`; None = every
    row) -> SemDeDup on those survivors only, removing the fraction `dedup_remove` of them (eps chosen for
    it) or, with `eps` instead, at that fixed eps -> spherical k-means re-run on the SemDeDup survivors and
    the `keep_fraction` (of the MinHash survivors) farthest from their centroid kept (SSL prototypes).
    Rows removed by MinHash are never embedded into SemDeDup's clusters and are never kept."""
    if (dedup_remove is None) == (eps is None):
        raise ValueError("give exactly one of dedup_remove (target ratio) and eps (fixed threshold)")
    mh = np.ones(len(emb), dtype=bool) if minhash_keep is None else np.asarray(minhash_keep, dtype=bool)
    base = np.flatnonzero(mh)
    sem = np.zeros(len(emb), dtype=bool)
    if dedup_remove is not None:
        keep_b, eps = semdedup_by_ratio(emb[base], n_clusters, dedup_remove, seed)
    else:
        keep_b = semdedup(emb[base], n_clusters, eps, seed)
    sem[base] = keep_b
    surv = np.flatnonzero(sem)
    n_keep = min(len(surv), int(round(keep_fraction * len(base))))
    out = np.zeros(len(emb), dtype=bool)
    if n_keep:
        scores = prototype_scores(emb[surv], n_clusters, seed)
        out[surv[np.argsort(-scores, kind="stable")[:n_keep]]] = True
    return D4Result(out, sem, float(eps))


def d4_select(emb: np.ndarray, n_clusters: int, eps: float, keep_fraction: float, seed: int = 0) -> np.ndarray:
    """D4 without the MinHash step at a fixed eps: SemDeDup, then re-cluster the survivors and keep the
    `keep_fraction` (of the original size) farthest from their prototypes. Returns the keep-mask over all
    rows (`d4` is the composition with MinHash and a target dedup ratio)."""
    return d4(emb, n_clusters, keep_fraction, seed, eps=eps).keep
