"""emulated_matmul: the PyTorch reference against an exact rational Python loop; batching; sanity."""

from __future__ import annotations

import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch

from common.lowp import emulated_matmul, get_format, quantize
from tests.lowp.lowp_oracle import round_exact


def loop_reference(a: torch.Tensor, b: torch.Tensor, in_fmt, acc_fmt, out_fmt, block_k: int, mode: str):
    """The model written as plain loops over exact rationals: inputs RNE to in_fmt, each block's exact sum
    added to the accumulator and the result rounded to acc_fmt with ``mode``, output RNE to out_fmt."""
    in_fmt, acc_fmt, out_fmt = get_format(in_fmt), get_format(acc_fmt), get_format(out_fmt)
    m, k = a.shape
    n = b.shape[1]
    aq = [[Fraction(round_exact(float(v), in_fmt, "rne")) for v in row] for row in a.tolist()]
    bq = [[Fraction(round_exact(float(v), in_fmt, "rne")) for v in row] for row in b.tolist()]
    out = np.zeros((m, n), dtype=np.float64)
    for i in range(m):
        for j in range(n):
            acc = Fraction(0)
            for k0 in range(0, k, block_k):
                block = sum(aq[i][t] * bq[t][j] for t in range(k0, min(k0 + block_k, k)))
                acc = Fraction(round_exact(acc + block, acc_fmt, mode))
            out[i, j] = round_exact(acc, out_fmt, "rne")
    return out


def random_inputs(m: int, k: int, n: int, seed: int, scale_spread: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g, dtype=torch.float64) * 10 ** (torch.rand(m, k, generator=g) * scale_spread - 1)
    b = torch.randn(k, n, generator=g, dtype=torch.float64) * 10 ** (torch.rand(k, n, generator=g) * scale_spread - 1)
    return a, b


CASES = [  # in, acc, out, block_k, mode
    ("fp16", "fp16", "fp16", 1, "rne"),
    ("bf16", "bf16", "bf16", 1, "rne"),
    ("bf16", "bf16", "fp32", 4, "rne"),
    ("bf16", "fp32", "bf16", 8, "rne"),
    ("fp8_e4m3fn", "fp22_e8m13", "bf16", 1, "rz"),
    ("fp8_e4m3fn", "fp22_e8m13", "fp32", 16, "rz"),
    ("fp8_e5m2", "fp16", "fp16", 4, "rz"),
    ("fp8_e4m3fn", "e5m4", "fp32", 1, "ru"),
    ("fp16", "e6m6", "fp32", 3, "rd"),
    ("fp4_e2m1", "fp8_e5m2", "fp32", 1, "rne"),
    ("bf16", "fp32", "fp32", 1, "rne"),  # float32 hardware fast path
    ("fp16", "fp32", "bf16", 1, "rne"),
]


@pytest.mark.parametrize("in_fmt,acc_fmt,out_fmt,block_k,mode", CASES)
def test_reference_matches_exact_loop(in_fmt, acc_fmt, out_fmt, block_k, mode):
    a, b = random_inputs(3, 37, 4, seed=zlib.crc32(f"{in_fmt}{acc_fmt}{block_k}".encode()))
    got = emulated_matmul(a, b, in_fmt, acc_fmt, out_fmt, block_k=block_k, mode=mode, backend="torch")
    want = loop_reference(a, b, in_fmt, acc_fmt, out_fmt, block_k, mode)
    np.testing.assert_array_equal(got.double().numpy(), want)


def test_accumulation_precision_matters():
    """A long fp16-accumulated sum of positive terms stagnates; fp32 accumulation does not."""
    a = torch.full((1, 8192), 1.0)
    b = torch.full((8192, 1), 1.0 + 2**-10)
    exact = 8192 * (1 + 2**-10)
    c16 = emulated_matmul(a, b, "fp16", "fp16", "fp32", block_k=1).item()
    c32 = emulated_matmul(a, b, "fp16", "fp32", "fp32", block_k=1).item()
    assert c32 == pytest.approx(exact, rel=2**-24)
    assert c16 == 4096.0  # fp16 spacing at 4096 is 4: 4096 + 1.001 rounds back to 4096 forever
    # block_k = K: one rounding of the exact dot product.
    assert emulated_matmul(a, b, "fp16", "fp16", "fp32", block_k=8192).item() == quantize(
        torch.tensor(exact), "fp16").item()


def test_fp32_accumulation_close_to_float64():
    a, b = random_inputs(8, 64, 5, seed=3)
    c = emulated_matmul(a, b, "fp32", "fp32", "fp32", block_k=1)
    ref = a.float().double() @ b.float().double()
    assert c.dtype == torch.float32
    bound = 65 * 2**-24 * (a.float().double().abs() @ b.float().double().abs())  # gamma_K |A||B| + output
    assert ((c.double() - ref).abs() <= bound).all()
    assert not torch.equal(c.double(), ref)  # the emulation does round


def test_batched_inputs_and_broadcast():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 20, generator=g)
    b = torch.randn(3, 20, 4, generator=g)
    b2 = torch.randn(20, 4, generator=g)
    kw = dict(in_fmt="bf16", acc_fmt="bf16", out_fmt="fp32", block_k=4, mode="rne")
    c = emulated_matmul(a, b, **kw)
    assert c.shape == (3, 5, 4)
    for i in range(3):
        assert torch.equal(c[i], emulated_matmul(a[i], b[i], **kw))
        assert torch.equal(emulated_matmul(a, b2, **kw)[i], emulated_matmul(a[i], b2, **kw))
    with pytest.raises(ValueError, match="inner dimensions"):
        emulated_matmul(a, b2.T, **kw)
    assert torch.equal(emulated_matmul(b2.T[None].expand(2, 4, 20), a[0].T, **kw)[1],
                       emulated_matmul(b2.T, a[0].T, **kw))
    assert torch.equal(emulated_matmul(a[:, :, :0], b2[:0], **kw), torch.zeros(3, 5, 4))  # K = 0


def test_stochastic_accumulation_unbiased_and_seeded():
    """Stochastic accumulation: reproducible per generator; the mean over 64 independent rows is close
    to the exact sum while RNE stagnates (bf16 spacing 4 at 512 swallows each +1.016)."""
    k = 2048
    a = torch.full((64, k), 1.0)
    b = torch.full((k, 1), 1.0 + 2**-6)
    exact = k * (1 + 2**-6)
    kw = dict(in_fmt="fp16", acc_fmt="bf16", out_fmt="fp32", block_k=1, mode="stochastic")
    vals = emulated_matmul(a, b, generator=torch.Generator().manual_seed(0), **kw)
    again = emulated_matmul(a, b, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(vals, again) and vals.unique().numel() > 1
    rne = emulated_matmul(a, b, "fp16", "bf16", "fp32", block_k=1)
    assert (rne == 512.0).all()
    # SR is unbiased per step, so the mean of 64 independent rows is within 4 standard errors of the exact
    # sum (false-alarm rate ~1e-4 for this fixed seed; measured: 0.7 standard errors); RNE is 75% off.
    sem = vals.std().item() / 64**0.5
    assert abs(vals.mean().item() - exact) < 4 * sem and sem < 0.01 * exact


@pytest.mark.parametrize("in_fmt", ["bf16", "fp16", "fp8_e5m2"])
def test_fp32_strict_fast_path_equals_generic(in_fmt, monkeypatch):
    """block_k=1 + fp32 RNE accumulation runs on float32 hardware additions when every product is a float32
    number; it must equal the generic float64 round-to-odd path bit for bit. Data with a huge dynamic
    range (products below 2^(2p-149)) must fall back to the generic path."""
    import common.lowp.reference as ref

    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 9, 200, generator=g) * 10 ** ((torch.rand(2, 9, 200, generator=g) - 0.5) * 4)
    b = torch.randn(200, 7, generator=g) * 10 ** ((torch.rand(200, 7, generator=g) - 0.5) * 4)
    aq, bq = ref.quantize_torch(a.double(), get_format(in_fmt)), ref.quantize_torch(b.double(), get_format(in_fmt))
    assert ref.fp32_hardware_exact(aq, bq, get_format(in_fmt), get_format("fp32"))
    fast = emulated_matmul(a, b, in_fmt, "fp32", "fp32", block_k=1)
    monkeypatch.setattr(ref, "fp32_hardware_exact", lambda *args: False)
    assert torch.equal(fast, emulated_matmul(a, b, in_fmt, "fp32", "fp32", block_k=1))
    monkeypatch.undo()
    tiny = torch.tensor([[2.0**-120, 1.0]], dtype=torch.float64)
    assert not ref.fp32_hardware_exact(tiny, tiny.T, get_format("bf16"), get_format("fp32"))
