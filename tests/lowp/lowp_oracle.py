"""Independent exact rounding oracle for the lowp tests: rational arithmetic (fractions), no bit tricks."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from common.lowp import FloatFormat


def _floor_log2(v: Fraction) -> int:
    e = v.numerator.bit_length() - v.denominator.bit_length()
    if Fraction(2) ** e > v:
        e -= 1
    return e


def round_exact(v: Fraction | float, fmt: FloatFormat, mode: str, negative_zero: bool = False) -> float:
    """``v`` rounded to ``fmt`` by the textbook definition (value as an exact rational)."""
    if isinstance(v, float):
        if math.isnan(v):
            return math.nan
        if math.isinf(v):
            if fmt.overflow == "inf":
                return v
            return math.copysign(fmt.max_normal, v) if fmt.overflow == "saturate" else math.nan
        negative_zero = math.copysign(1.0, v) < 0
        v = Fraction(v)
    neg = v < 0 or (v == 0 and negative_zero)
    a = abs(v)
    if a == 0:
        return -0.0 if neg else 0.0
    e = _floor_log2(a)
    if a < Fraction(fmt.min_normal) and not fmt.subnormals:
        qe = fmt.emin  # the grid {0, min_normal}
    else:
        qe = max(e, fmt.emin) - fmt.man_bits
    scaled = a / Fraction(2) ** qe
    fl = scaled.numerator // scaled.denominator
    rem = scaled - fl
    if mode == "rne":
        up = rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2 == 1)
    elif mode == "rz":
        up = False
    elif mode == "ru":
        up = rem > 0 and not neg
    elif mode == "rd":
        up = rem > 0 and neg
    else:
        raise ValueError(mode)
    val = math.ldexp(fl + int(up), qe)
    if val > fmt.max_normal:
        toward_zero = mode == "rz" or (mode == "rd" and not neg) or (mode == "ru" and neg)
        if toward_zero or fmt.overflow == "saturate":
            val = fmt.max_normal
        else:
            val = math.inf if fmt.overflow == "inf" else math.nan
    return -val if neg else val


def edge_values(fmt: FloatFormat, rng, n_random: int = 600, dtype_bits: int = 24) -> list[float]:
    """Grid points, exact midpoints and their container neighbours, boundaries, specials, random values."""
    out = [0.0, -0.0, math.inf, -math.inf, math.nan, fmt.max_normal, fmt.min_normal, fmt.min_subnormal]
    m = fmt.man_bits
    ulp_top = math.ldexp(1.0, fmt.emax - m)
    out += [fmt.max_normal + ulp_top / 2, fmt.max_normal + ulp_top / 4, fmt.max_normal + ulp_top,
            2 * fmt.max_normal, fmt.min_subnormal / 2, fmt.min_subnormal * 0.75, fmt.min_subnormal * 0.25,
            fmt.min_normal - fmt.min_subnormal, fmt.min_normal - fmt.min_subnormal / 2,
            fmt.min_subnormal * 1.5, fmt.min_subnormal * 2.5, fmt.min_subnormal * 3.5, fmt.min_normal * 1.5]
    for j in range(1, 2 ** min(m, 4) + 1):  # ties across the whole subnormal range and into min_normal
        out.append(fmt.min_subnormal * (j + 0.5))
    for _ in range(n_random // 3):
        e = int(rng.integers(fmt.emin - m - 1, fmt.emax + 1))
        k = int(rng.integers(2**m, 2 ** (m + 1)))
        grid = math.ldexp(k, e - m)
        mid = math.ldexp(2 * k + 1, e - m - 1)
        eps = math.ldexp(1.0, e - m - 1 - (dtype_bits - m - 2))  # well below the midpoint's spacing
        out += [grid, mid, mid + eps, mid - eps]
    for _ in range(n_random):
        e = rng.uniform(fmt.emin - m - 3, fmt.emax + 2)
        out.append(float(2.0**e * rng.uniform(1, 2)))
    sign = rng.choice([-1.0, 1.0], size=len(out))
    return [float(s * v) for s, v in zip(sign, out)] + out[:8]


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: identical bit patterns (so +0 != -0), or both NaN."""
    a, b = np.asarray(a), np.asarray(b)
    it = np.int64 if a.dtype == np.float64 else np.int32
    return (a.view(it) == b.view(it)) | (np.isnan(a) & np.isnan(b))


def assert_same(got: np.ndarray, want: np.ndarray, x: np.ndarray, what: str) -> None:
    """Bit-identical results, or an error naming the first mismatching inputs."""
    ok = same_bits(got, want)
    if not ok.all():
        i = np.where(~ok)[0][:8]
        raise AssertionError(f"{what}: {int((~ok).sum())} mismatches; x={x[i].tolist()} got={got[i].tolist()} "
                             f"want={want[i].tolist()}")
