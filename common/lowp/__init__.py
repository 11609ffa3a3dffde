"""Low-precision arithmetic: format emulation, emulated-accumulation matmul, native low-precision matmul.

    from common.lowp import FloatFormat, FORMATS, get_format, quantize, emulated_matmul
    y = quantize(x, "bf16", mode="rne")
    c = emulated_matmul(a, b, in_fmt="fp8_e4m3fn", acc_fmt=(8, 13), out_fmt="bf16", block_k=32, mode="rz")

Layers (each imports only the ones above it): ``formats`` + ``spec`` (formats, mode/overflow codes, shared
constants and checks) -> backends ``reference`` (PyTorch), ``cpu_kernels`` (numba), ``triton_kernels`` ->
``quantize`` / ``matmul`` (dispatch) -> ``tracer``. See README.md in this folder for the model and its
mapping to hardware.
"""

from common.lowp.formats import FORMATS, FloatFormat, get_format
from common.lowp.matmul import emulated_matmul
from common.lowp.quantize import quantize
from common.lowp.reference import emulated_matmul_torch, quantize_torch
from common.lowp.spec import MODES

__all__ = ["FORMATS", "MODES", "FloatFormat", "emulated_matmul", "emulated_matmul_torch", "get_format",
           "quantize", "quantize_torch"]
