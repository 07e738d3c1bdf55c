"""Shared ``@triton.jit`` helpers of the LoRA kernels: one place that decides how a tile reaches ``tl.dot``.

``DOT16`` (constexpr, chosen by the launcher through ``configs.dot_flags``): 16-bit tiles go into ``tl.dot`` as they
are (tensor cores, fp32 accumulation). Otherwise every tile is fp32 (converted right after ``tl.load``: under the
interpreter bf16 arithmetic is wrong) and the dot is exact fp32 (``ieee``) or, with ``TF32``, tf32.
"""
import triton
import triton.language as tl


@triton.jit
def load_tile(ptrs, mask, DOT16: tl.constexpr):
    """A tile as the dot will read it: its own 16-bit dtype when DOT16, else fp32 (zeros where masked)."""
    t = tl.load(ptrs, mask=mask, other=0.0)
    if not DOT16:
        t = t.to(tl.float32)
    return t


@triton.jit
def mma(a, b, acc, DOT16: tl.constexpr, TF32: tl.constexpr):
    """``acc + a @ b`` in fp32; a and b already in the dot dtype (the same 16-bit dtype when DOT16, else fp32)."""
    if DOT16:
        acc = tl.dot(a, b, acc)
    elif TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc
