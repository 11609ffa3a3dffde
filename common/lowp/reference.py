"""The PyTorch reference backend: rounding to a FloatFormat (``quantize_torch``) and the emulated-accumulation
matmul (``emulated_matmul_torch``), on any device.

Rounding works on the bit pattern. The value is rounded in its own container (float32 bits as int32, float64
bits as int64; float16/bfloat16 are widened to float32 exactly), so float64 inputs are rounded once, directly,
never via float32. For ``|x| >= min_subnormal`` the magnitude bits are an integer whose low ``r`` bits fall
below the target ulp, with ``r = Mc - m`` in the normal range and one more per binade below ``emin``
(gradual underflow). Dropping them with an increment first is the CPFloat recipe:

* RNE: add ``2^(r-1) - 1 + lsb`` then clear the low bits (the carry walks into the exponent by itself),
* RZ: clear; RU/RD: add ``2^r - 1`` when rounding away from zero, then clear,
* stochastic: add a uniform random integer in ``[0, 2^r)``, then clear (P(up) = distance / ulp).

Magnitudes below the smallest positive number ``q`` (``min_subnormal``, or ``min_normal`` with subnormals
off) go to 0 or ``q`` by comparison (RNE: ties to 0, the even one). Overflow follows ``fmt.overflow``.
Formats without -0 (``specials="fnuz"``) turn zero results into +0; the unsigned e8m0 layout
(``specials="fnu"``: no zero) gives ``q`` below ``q`` in every mode and NaN for inputs <= 0. With no
fraction bits (e8m0) both neighbours of an RNE tie have the significand 1: the kept last bit is the
implicit bit, so ties round up in magnitude (as the torch and ml_dtypes casts do).

The matmul model and its exactness argument are in ``matmul.py``'s docstring. A backend: imports only the
format/spec layer (``formats.py``, ``spec.py``).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from common.lowp.formats import FORMATS, FloatFormat, container_format
from common.lowp.spec import (
    INT_VIEW,
    check_matmul_args,
    check_mode,
    exact_block_mask,
    format_constants,
    needs_work,
    output_dtype,
    products_exact,
    random_bits,
    resolve_container,
    same_range_ieee,
)


def round_general(x: torch.Tensor, fmt: FloatFormat, mode: str, rnd: torch.Tensor | None) -> torch.Tensor:
    """Round a float32/float64 tensor to ``fmt`` (any value: subnormal, tiny, overflow, inf, NaN)."""
    it = INT_VIEW[x.dtype]
    c = format_constants(fmt, x.dtype)
    sign_bit = torch.iinfo(it).min
    bits = x.view(it)
    sign = bits & sign_bit
    neg = sign != 0
    finite = torch.isfinite(x)
    a = torch.where(finite, bits & ~sign_bit, 0)                     # magnitude bits (0 for inf/NaN)

    # Bits to drop: r0 in the normal range, +1 per binade below emin (container subnormals: field 1).
    field = (a >> c["MC"]).clamp_min(1)
    r = ((c["EMIN_FIELD"] - field).clamp_min(0) + c["R0"]).clamp_max(c["MC"])
    mask = (torch.ones_like(a) << r) - 1
    if mode == "rne":
        # The kept last bit; at r == Mc (the smallest binade) it is the implicit bit, not an exponent bit.
        sig = (a & ((1 << c["MC"]) - 1)) | ((a >> c["MC"]) > 0).to(it) << c["MC"]
        inc = (mask >> 1) + ((sig >> r) & (r > 0).to(it))
    elif mode == "rz":
        inc = torch.zeros_like(a)
    elif mode == "ru":
        inc = torch.where(neg, 0, mask)
    elif mode == "rd":
        inc = torch.where(neg, mask, 0)
    else:
        inc = rnd & mask
    mag = (a + inc) & ~mask

    # Below the smallest positive number q: 0 or q.
    tiny = a < c["Q_BITS"]
    if mode == "rne":
        up = a > c["HALF_Q_BITS"]
    elif mode == "rz":
        up = torch.zeros_like(tiny)
    elif mode == "ru":
        up = (a > 0) & ~neg
    elif mode == "rd":
        up = (a > 0) & neg
    else:
        mc = container_format(x.dtype).man_bits
        u = rnd.to(x.dtype) * 2.0**-mc
        up = u < x.abs() / c["Q"]
    if not fmt.signed:  # no zero (e8m0): (0, q) has only q to go to, in every mode
        up = torch.ones_like(tiny)
    mag = torch.where(tiny, up.to(it) * c["Q_BITS"], mag)

    # Overflow of finite values, then inf inputs, per the format's policy.
    if mode == "rd":
        toward_zero = ~neg
    elif mode == "ru":
        toward_zero = neg
    elif mode == "rz":
        toward_zero = torch.ones_like(neg)
    else:
        toward_zero = torch.zeros_like(neg)
    over = mag > c["MAX_BITS"]
    make_nan = torch.zeros_like(neg)
    if fmt.overflow == "inf":
        over_mag = torch.where(toward_zero, c["MAX_BITS"], c["INF_BITS"])
        inf_mag = c["INF_BITS"]
    elif fmt.overflow == "saturate":
        over_mag = torch.full_like(mag, c["MAX_BITS"])
        inf_mag = c["MAX_BITS"]
    else:  # "nan"
        over_mag = torch.full_like(mag, c["MAX_BITS"])
        make_nan = (over & ~toward_zero) | torch.isinf(x)
        inf_mag = c["INF_BITS"]
    mag = torch.where(over, over_mag, mag)
    mag = torch.where(torch.isinf(x), inf_mag, mag)
    if not fmt.has_negative_zero:  # fnuz: -0 is the NaN code, a zero result is +0
        sign = torch.where(mag == 0, 0, sign)
    if not fmt.signed:  # e8m0: no sign and no zero, so x <= 0 (-0, -inf included) is not representable
        make_nan = make_nan | (x <= 0)
    out = (mag.to(it) | sign).view(x.dtype)
    out = torch.where(make_nan, float("nan"), out)
    return torch.where(torch.isnan(x), x, out)


def _round_normal(bits: torch.Tensor, r0: int, mode: str, rnd: torch.Tensor | None) -> torch.Tensor:
    """Fast path for values whose result is a normal number: a constant ``r0`` bits to drop, computed on
    the signed bit pattern (the sign bit is above every carry), a handful of in-place integer passes."""
    if r0 == 0:  # full container precision: normal results are exact
        return bits.clone()
    mask = (1 << r0) - 1
    if mode == "rne":
        inc = (bits >> r0).bitwise_and_(1).add_(mask >> 1)
    elif mode == "rz":
        return bits & ~mask
    elif mode in ("ru", "rd"):
        neg_ones = bits >> (bits.element_size() * 8 - 1)  # -1 where negative, 0 elsewhere
        inc = (neg_ones if mode == "rd" else neg_ones.bitwise_not_()).bitwise_and_(mask)
    else:
        inc = rnd & mask
    return inc.add_(bits).bitwise_and_(~mask)


def native_cast_dtype(fmt: FloatFormat, x: torch.Tensor, mode: str) -> torch.dtype | None:
    """torch's own float32 -> bf16/fp16 cast is IEEE RNE with gradual underflow and overflow to inf: the
    same function as our rounding for exactly these formats (checked bit for bit in the tests)."""
    if mode != "rne" or x.dtype != torch.float32:
        return None
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if fmt == FORMATS[name] or (fmt.exp_bits, fmt.man_bits, fmt.exponent_bias, fmt.subnormals,
                                    fmt.specials, fmt.overflow) == (FORMATS[name].exp_bits,
                                    FORMATS[name].man_bits, FORMATS[name].exponent_bias, True, "ieee", "inf"):
            return dt
    return None


def _round_container(x: torch.Tensor, fmt: FloatFormat, mode: str, generator: torch.Generator | None):
    """Round a contiguous float32/float64 tensor: the fast path for every element whose magnitude lies in
    [min_normal, max_normal] (or is 0), the general routine for the few others."""
    it = INT_VIEW[x.dtype]
    c = format_constants(fmt, x.dtype)
    rnd = random_bits(x.shape, x.dtype, x.device, generator) if mode == "stochastic" else None
    if not fmt.signed:  # e8m0 (block scales: small tensors): zero and negatives need the general routine
        return round_general(x, fmt, mode, rnd)
    bits = x.view(it)
    y = _round_normal(bits, c["R0"], mode, rnd)
    if same_range_ieee(fmt, x.dtype) and mode != "stochastic":  # (SR: same random-bit use as Triton)
        # Container subnormals, overflow to inf and inf itself come out right from the fast path (the
        # carry runs into the all-ones exponent); only NaN payloads could be truncated to inf.
        nan = torch.isnan(x)
        if nan.any():
            y[nan] = bits[nan]
        return y.view(x.dtype)
    a = bits & torch.iinfo(it).max
    if mode != "stochastic":
        sub = a < c["MIN_NORMAL_BITS"]
        n_sub = int(sub.sum())
        if n_sub > x.numel() // 16:  # many (fp4/fp6 data): whole-tensor passes beat a gather
            y = torch.where(sub, _round_fixed_point(x, fmt, mode).view(it), y)
        elif n_sub:
            idx = sub.nonzero(as_tuple=True)
            y[idx] = _round_fixed_point(x[idx], fmt, mode).view(it)
        slow = a > c["MAX_BITS"]
    else:
        slow = (a > c["MAX_BITS"]).logical_or_((a < c["MIN_NORMAL_BITS"]).logical_and_(a != 0))
    if slow.any():
        idx = slow.nonzero(as_tuple=True)
        y[idx] = round_general(x[idx], fmt, mode, None if rnd is None else rnd[idx]).view(it)
    if not fmt.has_negative_zero:  # fnuz: the fast and fixed-point paths keep the sign of a zero result
        y.masked_fill_(y == torch.iinfo(it).min, 0)
    return y.view(x.dtype)


_ROUND_INT = {"rne": torch.round, "rz": torch.trunc, "ru": torch.ceil, "rd": torch.floor}


def _round_fixed_point(x: torch.Tensor, fmt: FloatFormat, mode: str) -> torch.Tensor:
    """Rounding below min_normal, where the grid is fixed-point with spacing q = min_subnormal (or
    min_normal without subnormals): scale by 1/q (two exact power-of-two steps, 1/q may exceed the
    container's range), round to an integer in ``mode`` (torch.round is half-to-even), scale back (exact:
    k*q is representable). Valid only for |x| < min_normal."""
    q = fmt.min_subnormal
    e = -math.frexp(q)[1] + 1  # 1/q = 2^e
    scaled = (x * 2.0 ** (e // 2)) * 2.0 ** (e - e // 2)
    k = _ROUND_INT[mode](scaled)
    if e < 0 and mode in ("ru", "rd"):
        # q > 1 (negative bias): scaling down can flush a tiny nonzero x to 0, yet directed rounding must
        # still step away from zero to ±q on its side
        lost = (scaled == 0) & (x != 0)
        away = (x > 0) if mode == "ru" else (x < 0)
        k = torch.where(lost & away, torch.sign(x), k)
    return k * q


def quantize_torch(x: torch.Tensor, fmt: FloatFormat, mode: str = "rne",
                   generator: torch.Generator | None = None, native_cast: bool = False) -> torch.Tensor:
    """PyTorch reference of :func:`quantize` (any device). ``native_cast``: use torch's float32 -> bf16/fp16
    cast where it is the identical function (RNE to exactly those formats), else the integer path."""
    check_mode(mode)
    if not needs_work(fmt, x.dtype):
        return x.clone()
    if native_cast and (dt := native_cast_dtype(fmt, x, mode)) is not None:
        return x.to(dt).to(x.dtype)
    work = resolve_container(x, fmt)
    y = _round_container(x.to(work).contiguous(), fmt, mode, generator)
    return y.to(x.dtype)  # exact: fmt fits in x.dtype


# ------------------------------------------------------------------------------ emulated matmul
def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Knuth's TwoSum: ``(s, e)`` with ``s = fl(a + b)`` and ``a + b == s + e`` exactly (finite values)."""
    s = a + b
    bp = s - a
    return s, (a - (s - bp)) + (b - bp)


def round_to_odd_add(acc: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``acc + part`` (float64) rounded to odd: the float64 neighbour with an odd last bit when inexact."""
    s, err = two_sum(acc, part)
    bits = s.view(torch.int64)
    fix = (err != 0) & torch.isfinite(err) & ((bits & 1) == 0)
    step = torch.where((err > 0) == (s > 0), 1, -1)  # move the magnitude toward the exact value
    return torch.where(fix, bits + step, bits).view(torch.float64)


_MAX_LEVELS = 64  # each level takes >= 53 - ceil(log2 n) - 1 bits; float64 spans 2098


def extract_levels(terms: torch.Tensor) -> list[torch.Tensor]:
    """Float64 tensors ``tau_1, tau_2, ...`` (shape ``terms.shape[:-1]``) whose sum is exactly the sum of each
    row of ``terms`` (finite, max |term| < 2^(1020 - ceil(log2 n))): Rump, Ogita & Oishi's ExtractVector,
    repeated until nothing is left. With ``sigma = 2^k >= n max|p|`` per row, ``q = fl(sigma + p) - sigma``
    is a multiple of 2^-53 sigma with |q| <= sigma / n, so ``sum(q)`` is exact in any order (every partial
    sum is a multiple of 2^-53 sigma of magnitude <= sigma), ``p - q`` is exact (it is the rounding error
    of sigma + p) and below 2^-53 sigma: each level takes >= 53 - ceil(log2 n) - 1 bits off the top."""
    shift = max(1, (terms.shape[-1] - 1).bit_length())  # 2^shift >= n
    taus = []
    p = terms
    for _ in range(_MAX_LEVELS):
        _, e = torch.frexp(p.abs().amax(-1, keepdim=True))  # max|p| < 2^e
        sigma = torch.ldexp(torch.ones_like(p[..., :1]), e + shift)
        q = (sigma + p) - sigma
        p = p - q
        taus.append(q.sum(-1))
        if not p.any():
            return taus
    raise RuntimeError("extract_levels did not terminate (non-finite or out-of-range terms)")


def _grow_expansion(e: list[torch.Tensor], b: torch.Tensor) -> list[torch.Tensor]:
    """Shewchuk's Grow-Expansion: ``e`` (nonoverlapping, increasing magnitude, zeros anywhere) plus ``b``,
    exactly, as an expansion with the same properties (round-to-nearest-even arithmetic)."""
    out = []
    q = b
    for c in e:
        q, h = two_sum(q, c)
        out.append(h)
    out.append(q)
    return out


def _expansion_sign(e: list[torch.Tensor]) -> torch.Tensor:
    """Sign (-1, 0, 1) of the exact sum of a nonoverlapping expansion: that of its largest nonzero
    component (the smaller ones add up to less than its lowest set bit)."""
    sign = torch.zeros_like(e[0])
    for c in e:  # increasing magnitude: the last nonzero one wins
        sign = torch.where(c != 0, torch.sign(c), sign)
    return sign


def _float64_of_sum_python(values: list[float], rounding: str) -> float:
    """The exact sum of ``values`` rounded to float64 (``rounding``: "odd" or "nearest"), with rationals."""
    exact = sum((Fraction(v) for v in values), Fraction(0))
    h = float(exact)  # correctly rounded to nearest (even)
    if rounding == "nearest" or Fraction(h) == exact:
        return h
    nb = math.nextafter(h, math.inf if exact > h else -math.inf)
    return h if int(torch.tensor(h, dtype=torch.float64).view(torch.int64)) & 1 else nb


def exact_sum_float64(terms: torch.Tensor, rounding: str = "odd") -> torch.Tensor:
    """The exact sum of each row of ``terms`` (2-D float64, finite, see ``extract_levels``) rounded to
    float64: ``rounding="odd"`` (round-to-odd) or ``"nearest"`` (ties to even). The level sums become an
    exact nonoverlapping expansion (Grow-Expansion); its float sum h is within an ulp of the exact sum S,
    and exact signs of ``S - h``, ``S - nb`` (nb: h's neighbour toward S) and of S minus their midpoint
    (more expansions) place S; rows where h is not within an ulp (not expected) are done with rationals."""
    taus = extract_levels(terms)
    e = [taus[0]]
    for t in taus[1:]:
        e = _grow_expansion(e, t)
    h = e[0]
    for c in e[1:]:
        h = h + c
    rest = _grow_expansion(e, -h)  # S - h, exactly
    sh = _expansion_sign(rest)
    nb = torch.nextafter(h, torch.where(sh > 0, math.inf, -math.inf).to(h.dtype))  # toward S
    sn = _expansion_sign(_grow_expansion(e, -nb))
    h_odd = (h.view(torch.int64) & 1) == 1
    if rounding == "odd":
        between = torch.where(h_odd, h, nb)
    else:
        # sign of S - (h + nb)/2: (nb - h) is an exact float and halving it is exact (S, a sum of floats,
        # cannot lie strictly between two neighbouring subnormals, so that case never reaches here).
        sm = _expansion_sign(_grow_expansion(rest, -(nb - h) * 0.5))
        between = torch.where(sm * sh > 0, nb, torch.where(sm * sh < 0, h, torch.where(h_odd, nb, h)))
    out = torch.where(sh == 0, h, torch.where(sn == 0, nb, between))
    unsettled = (sh != 0) & (sn != 0) & (sn == sh)  # S beyond the neighbour
    if unsettled.any():
        out = out.clone()
        for r in unsettled.nonzero().flatten().tolist():
            out[r] = _float64_of_sum_python([float(t[r]) for t in taus], rounding)
    return out


_EXACT_CHUNK = 1 << 22  # products per chunk of the exact block sum (memory)


def exact_block_update(s: torch.Tensor, acc: torch.Tensor, a_blk: torch.Tensor, b_blk: torch.Tensor,
                       mask: torch.Tensor, rounding: str = "odd") -> torch.Tensor:
    """``s`` with the elements in ``mask`` replaced by ``acc + sum_k a_ik b_kj`` computed exactly (float64
    products: exact for ``products_exact`` formats) and rounded to float64 (``exact_sum_float64``).
    Non-finite or near-overflow elements keep ``s`` (IEEE float64 arithmetic)."""
    batch = s.shape[:-2]
    a_e = a_blk.expand(*batch, *a_blk.shape[-2:])
    b_t = b_blk.expand(*batch, *b_blk.shape[-2:]).transpose(-1, -2)
    kb = a_blk.shape[-1]
    limit = 2.0 ** (1020 - max(1, kb.bit_length()))  # extract_levels' sigma stays finite
    mask = mask & torch.isfinite(s) & (s.abs() < limit)
    idx = mask.nonzero(as_tuple=True)
    if idx[0].numel() == 0:
        return s
    out = s.clone()
    step = max(1, _EXACT_CHUNK // (kb + 1))
    for c0 in range(0, idx[0].numel(), step):
        ix = tuple(t[c0:c0 + step] for t in idx)
        terms = torch.cat([a_e[ix[:-1]] * b_t[ix[:-2] + ix[-1:]], acc[ix][:, None]], dim=1)
        ok = torch.isfinite(terms).all(1) & (terms.abs().amax(1) < limit)
        exact = exact_sum_float64(torch.where(ok[:, None], terms, 0.0), rounding)
        out[ix] = torch.where(ok, exact, s[ix])
    return out


def fp32_hardware_exact(aq: torch.Tensor, bq: torch.Tensor, in_fmt: FloatFormat, acc_fmt: FloatFormat) -> bool:
    """True when float32 hardware addition *is* the model (strict fp32 RNE accumulation): the accumulator
    format is exactly fp32 and every product is a float32 number (<= 12-bit significands, and no product
    below 2^(2p-149) or above 2^127 in magnitude, checked on the data)."""
    fp32 = FORMATS["fp32"]
    if (acc_fmt.exp_bits, acc_fmt.man_bits, acc_fmt.exponent_bias, acc_fmt.subnormals, acc_fmt.specials,
            acc_fmt.overflow) != (8, 23, 127, True, "ieee", "inf") or 2 * in_fmt.precision > fp32.precision:
        return False
    na, nb = aq[aq != 0].abs(), bq[bq != 0].abs()
    if na.numel() == 0 or nb.numel() == 0:
        return True
    lo = na.min().item() * nb.min().item()
    hi = na.max().item() * nb.max().item()
    return lo >= 2.0 ** (2 * in_fmt.precision - 149) and hi < 2.0**127


def _fp32_recursive_sum(aq: torch.Tensor, bq: torch.Tensor) -> torch.Tensor:
    """sum_k a_ik b_kj in float32, one RNE addition after another (k in order); exact products."""
    a32, b32 = aq.to(torch.float32), bq.to(torch.float32)
    acc = a32[..., :, :1] * b32[..., :1, :]
    for k in range(1, a32.shape[-1]):
        acc = acc + a32[..., :, k:k + 1] * b32[..., k:k + 1, :]
    return acc.to(torch.float64)


def emulated_matmul_torch(a: torch.Tensor, b: torch.Tensor, in_fmt: FloatFormat, acc_fmt: FloatFormat,
                          out_fmt: FloatFormat, block_k: int = 1, mode: str = "rne",
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`emulated_matmul` (float64 containers, any device)."""
    check_matmul_args(a, b, block_k)
    aq = quantize_torch(a.to(torch.float64), in_fmt)
    bq = quantize_torch(b.to(torch.float64), in_fmt)
    k_total = aq.shape[-1]
    if block_k == 1 and mode == "rne" and fp32_hardware_exact(aq, bq, in_fmt, acc_fmt):
        return quantize_torch(_fp32_recursive_sum(aq, bq), out_fmt).to(output_dtype(out_fmt))
    # Round-to-odd at 53 bits then rounding to acc_fmt is the correct rounding when 53 >= p + 2
    # (Boldo-Melquiond); wider accumulators get the exact sum rounded to nearest float64.
    rounding = "odd" if acc_fmt.man_bits <= 50 else "nearest"
    prods_exact = products_exact(in_fmt)  # else: products and block sums are plain float64 arithmetic
    acc = None
    for k0 in range(0, k_total, block_k):
        k1 = min(k0 + block_k, k_total)
        a_blk, b_blk = aq[..., k0:k1], bq[..., k0:k1, :]
        part = a_blk @ b_blk  # exact where exact_block_mask says so (always for one product)
        if acc is None:
            acc = torch.zeros_like(part)
        s = round_to_odd_add(acc, part) if rounding == "odd" else acc + part
        if prods_exact and k1 - k0 > 1:
            inexact = ~exact_block_mask(a_blk, b_blk, in_fmt)
            if inexact.any():
                s = exact_block_update(s, acc, a_blk, b_blk, inexact, rounding)
        acc = quantize_torch(s, acc_fmt, mode, generator)
    if acc is None:  # K == 0: an empty sum
        acc = aq @ bq
    return quantize_torch(acc, out_fmt).to(output_dtype(out_fmt))
