"""Binary floating-point formats: exponent/mantissa widths, bias, subnormals, special values, overflow.

A format is the set of numbers ``±2^e · 1.f`` (normal, ``emin ≤ e ≤ emax``, ``man_bits`` fraction bits) and,
with subnormals, ``±2^emin · 0.f``. What the top exponent field encodes is ``specials``:

* ``"ieee"``: the top exponent field is reserved for ±inf and NaN (fp16, bf16, fp32, e5m2, ...).
* ``"fn"``:   finite + NaN only; the top field holds normal numbers except the all-ones mantissa, which is
  NaN (OCP fp8 e4m3fn: max 448).
* ``"none"``: every encoding is a finite number (OCP fp6 e3m2/e2m3, fp4 e2m1: no inf, no NaN).
* ``"fnuz"``: finite + NaN, unsigned zero: every exponent field holds numbers, the only NaN is the
  negative-zero code (0x80), there is no inf and no -0 (a zero result is +0). The AMD/Graphcore fp8
  formats e4m3fnuz (bias 8, max 240) and e5m2fnuz (bias 16, max 57344).
* ``"fnu"``: finite + NaN, unsigned, no zero: ``man_bits == 0``, no subnormals, exponent field 0 is the
  number ``2^-bias`` and the all-ones field is NaN (OCP MX scale e8m0fnu: 2^-127 .. 2^127). Inputs <= 0
  (-0 included) have no representation and give NaN (as ml_dtypes); positive inputs below the smallest
  number give it in every rounding mode (there is nothing smaller to round down to).

``overflow`` says what a result that rounds beyond ``max_normal`` becomes: ``"inf"`` (IEEE; needs
``specials="ieee"``), ``"saturate"`` (±max_normal, also for ±inf inputs: NVIDIA ``satfinite``, torch's
CPU e4m3fn cast, ml_dtypes' fp6/fp4 casts) or ``"nan"`` (ml_dtypes' e4m3fn cast; ±inf inputs become NaN
too). As in IEEE 754, the directed modes that round toward zero for the value's sign (RZ; RD for
positive, RU for negative values) never overflow: they return ±max_normal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SPECIALS = ("ieee", "fn", "none", "fnuz", "fnu")
OVERFLOWS = ("inf", "saturate", "nan")


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format. ``bias=None`` means the IEEE bias ``2^(exp_bits-1) - 1``."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int | None = None
    subnormals: bool = True
    overflow: str = "inf"
    specials: str = "ieee"

    def __post_init__(self) -> None:
        if not 1 <= self.exp_bits <= 11:
            raise ValueError(f"format {self.name!r}: exp_bits must be in 1..11, got {self.exp_bits}")
        if not 0 <= self.man_bits <= 52:
            raise ValueError(f"format {self.name!r}: man_bits must be in 0..52, got {self.man_bits}")
        if self.specials not in SPECIALS:
            raise ValueError(f"format {self.name!r}: specials must be one of {SPECIALS}, got {self.specials!r}")
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"format {self.name!r}: overflow must be one of {OVERFLOWS}, got {self.overflow!r}")
        if self.overflow == "inf" and self.specials != "ieee":
            raise ValueError(f"format {self.name!r}: overflow='inf' needs specials='ieee' (an inf encoding)")
        if self.overflow == "nan" and self.specials == "none":
            raise ValueError(f"format {self.name!r}: overflow='nan' needs a NaN encoding (specials != 'none')")
        if self.specials == "fn" and self.man_bits == 0:
            raise ValueError(f"format {self.name!r}: specials='fn' needs man_bits >= 1")
        if self.specials == "fnu" and (self.man_bits != 0 or self.subnormals):
            raise ValueError(f"format {self.name!r}: specials='fnu' (unsigned, no zero: the e8m0 scale layout) "
                             f"needs man_bits=0 and subnormals=False")
        if self.emax < self.emin:
            raise ValueError(f"format {self.name!r}: empty exponent range (emin={self.emin}, emax={self.emax})")

    @property
    def ieee_bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def exponent_bias(self) -> int:
        return self.ieee_bias if self.bias is None else self.bias

    @property
    def precision(self) -> int:
        """Significand bits including the implicit leading bit (t in u = 2^-t)."""
        return self.man_bits + 1

    @property
    def unit_roundoff(self) -> float:
        """u = 2^-t for round-to-nearest (the relative error bound of one rounding; 2u for directed modes)."""
        return 2.0 ** -self.precision

    @property
    def emin(self) -> int:
        # "fnu" has no zero/subnormals: field 0 is the number 2^-bias.
        return -self.exponent_bias if self.specials == "fnu" else 1 - self.exponent_bias

    @property
    def emax(self) -> int:
        top = 2**self.exp_bits - 1  # largest exponent field
        # "ieee" reserves the top field for inf/NaN; "fnu" (no mantissa) gives its one code to NaN.
        return top - self.exponent_bias - (1 if self.specials in ("ieee", "fnu") else 0)

    @property
    def max_normal(self) -> float:
        # "fn" gives up the all-ones mantissa of the top binade to NaN: one ulp less.
        ulps_lost = 2 if self.specials == "fn" else 1
        return math.ldexp(2.0 - ulps_lost * 2.0**-self.man_bits, self.emax)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive number (min_normal when subnormals are off)."""
        return math.ldexp(1.0, self.emin - self.man_bits) if self.subnormals else self.min_normal

    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee"

    @property
    def has_negative_zero(self) -> bool:
        """False for "fnuz" (its -0 code is the NaN: -0 results become +0) and "fnu" (no zero at all)."""
        return self.specials not in ("fnuz", "fnu")

    @property
    def signed(self) -> bool:
        """False for "fnu" (e8m0: no sign bit, so inputs <= 0 give NaN)."""
        return self.specials != "fnu"

    def fits_in(self, other: FloatFormat) -> bool:
        """Every finite number of ``self`` is a finite number of ``other`` (normal range nested too)."""
        return (self.man_bits <= other.man_bits and self.emin >= other.emin
                and self.max_normal <= other.max_normal)

    def with_(self, **changes) -> FloatFormat:
        """A copy with some fields changed, e.g. ``get_format('fp8_e4m3fn').with_(overflow='saturate')``."""
        from dataclasses import replace

        return replace(self, **changes)

    def __str__(self) -> str:
        return (f"{self.name}(e{self.exp_bits}m{self.man_bits}, bias={self.exponent_bias}, "
                f"subnormals={self.subnormals}, specials={self.specials}, overflow={self.overflow})")


FORMATS: dict[str, FloatFormat] = {f.name: f for f in [
    FloatFormat("fp64", 11, 52),
    FloatFormat("fp32", 8, 23),
    FloatFormat("tf32", 8, 10),
    FloatFormat("bf16", 8, 7),
    FloatFormat("fp16", 5, 10),
    FloatFormat("fp8_e4m3fn", 4, 3, specials="fn", overflow="nan"),            # ml_dtypes default cast
    FloatFormat("fp8_e4m3fn_sat", 4, 3, specials="fn", overflow="saturate"),   # torch CPU / Triton cast
    FloatFormat("fp8_e5m2", 5, 2),
    FloatFormat("fp8_e5m2_sat", 5, 2, overflow="saturate"),
    FloatFormat("fp8_e4m3", 4, 3),                                             # IEEE-like, max 240
    FloatFormat("fp8_e3m4", 3, 4),
    # fnuz (bias 2^(e-1), NaN = 0x80, no inf, no -0), overflow NaN as the torch and ml_dtypes casts.
    FloatFormat("fp8_e4m3fnuz", 4, 3, bias=8, specials="fnuz", overflow="nan"),
    FloatFormat("fp8_e5m2fnuz", 5, 2, bias=16, specials="fnuz", overflow="nan"),
    # OCP MX block scale: 2^-127 .. 2^127, NaN = 0xFF; overflow NaN as the torch and ml_dtypes casts.
    FloatFormat("fp8_e8m0fnu", 8, 0, bias=127, subnormals=False, specials="fnu", overflow="nan"),
    FloatFormat("fp6_e3m2", 3, 2, specials="none", overflow="saturate"),
    FloatFormat("fp6_e2m3", 2, 3, specials="none", overflow="saturate"),
    FloatFormat("fp4_e2m1", 2, 1, specials="none", overflow="saturate"),
    # Hopper fp8 tensor-core accumulator as reported by third parties: 8-bit exponent, 13 fraction bits
    # (used with mode="rz"); unverified on hardware.
    FloatFormat("fp22_e8m13", 8, 13),
]}

# Short names with exactly one meaning. "e5m2" is OCP's E5M2 = the IEEE-like preset, which is also what
# the generic "e<E>m<M>" reading gives.
ALIASES = {"float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32", "bfloat16": "bf16",
           "float16": "fp16", "half": "fp16", "e4m3fn": "fp8_e4m3fn", "e4m3fnuz": "fp8_e4m3fnuz",
           "e5m2": "fp8_e5m2", "e5m2fnuz": "fp8_e5m2fnuz", "e8m0fnu": "fp8_e8m0fnu", "fp4": "fp4_e2m1",
           "fp22": "fp22_e8m13"}

# Short names that mean different formats in different places (OCP/torch/ml_dtypes names vs the generic
# IEEE-like "e<E>m<M>" reading): get_format refuses them and lists the precise names.
AMBIGUOUS = {
    "e4m3": "'fp8_e4m3fn' (OCP E4M3: max 448, NaN on overflow as ml_dtypes), 'fp8_e4m3fn_sat' (saturating, "
            "as torch's CPU cast), 'fp8_e4m3' (IEEE-like with inf: max 240), 'fp8_e4m3fnuz' (bias 8, max 240, "
            "no inf, no -0)",
    "fp8": "'fp8_e4m3fn', 'fp8_e4m3fn_sat', 'fp8_e4m3', 'fp8_e4m3fnuz', 'fp8_e5m2', 'fp8_e5m2_sat', "
           "'fp8_e5m2fnuz', 'fp8_e3m4' or 'fp8_e8m0fnu'",
    "e3m2": "'fp6_e3m2' (OCP FP6: no inf/NaN, saturating) or (3, 2) (IEEE-like with inf and NaN)",
    "e2m3": "'fp6_e2m3' (OCP FP6: no inf/NaN, saturating) or (2, 3) (IEEE-like with inf and NaN)",
    "e2m1": "'fp4_e2m1' (OCP FP4: no inf/NaN, saturating) or (2, 1) (IEEE-like with inf and NaN)",
    "e8m0": "'fp8_e8m0fnu' (OCP MX scale: unsigned powers of two 2^-127..2^127, NaN) or (8, 0) (IEEE-like: "
            "signed, zero, inf)",
}


def get_format(spec: str | FloatFormat | tuple[int, int]) -> FloatFormat:
    """A preset by name (see ``FORMATS``/``ALIASES``), a FloatFormat, ``(exp_bits, man_bits)`` or "e5m10"
    (IEEE-like: bias 2^(E-1) - 1, subnormals, inf and NaN). A name in ``AMBIGUOUS`` raises ValueError."""
    if isinstance(spec, FloatFormat):
        return spec
    if isinstance(spec, tuple):
        e, m = spec
        return FloatFormat(f"e{e}m{m}", int(e), int(m))
    if isinstance(spec, str):
        if spec.lower() in AMBIGUOUS:
            raise ValueError(f"float format name {spec!r} is ambiguous; use one of {AMBIGUOUS[spec.lower()]}")
        key = ALIASES.get(spec.lower(), spec.lower())
        if key in FORMATS:
            return FORMATS[key]
        if key.startswith("e") and "m" in key:
            e, _, m = key[1:].partition("m")
            if e.isdigit() and m.isdigit():
                return FloatFormat(key, int(e), int(m))
    raise ValueError(f"unknown float format {spec!r}; presets: {sorted(FORMATS)} or 'e<E>m<M>' or (E, M)")


# The container dtypes the emulation computes in, as formats.
CONTAINERS: dict[torch.dtype, FloatFormat] = {
    torch.float64: FORMATS["fp64"], torch.float32: FORMATS["fp32"],
    torch.bfloat16: FORMATS["bf16"], torch.float16: FORMATS["fp16"],
}


def container_format(dtype: torch.dtype) -> FloatFormat:
    if dtype not in CONTAINERS:
        raise TypeError(f"quantize works on float64/float32/bfloat16/float16 tensors, got {dtype}")
    return CONTAINERS[dtype]

