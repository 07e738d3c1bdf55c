"""Tolerances by dtype, in one place (Punica / vLLM practice), and a comparison that prints the worst mismatch.

Every kernel result is compared with the fp32 torch reference at the tolerance of the dtype it is produced in:
- ``torch.float32`` / ``float16`` / ``bfloat16``: a result in that dtype (Punica, vLLM: 1e-5, 5e-3, 3e-2 / 2e-2);
- ``"fp32_of_16bit"``: an fp32 result (the shrink's ``buf``) of fp16/bf16 operands: the products are exact in fp32,
  only the summation order differs from the reference, 10x the fp32 tolerance;
- ``"tf32"``: an fp32 result of tf32 dots (``LUMOE_TF32=1``, GPU only): 10-bit mantissa products, 2e-3.
``tol_for_buf(dtype)`` names the right one for a shrink buffer of inputs in ``dtype``.
"""
import torch

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
    "fp32_of_16bit": dict(atol=1e-4, rtol=1e-4),
    "tf32": dict(atol=2e-3, rtol=2e-3),
}


def tol(dtype, scale: float = 1.0) -> dict:
    """atol/rtol for ``dtype`` (a torch dtype or a key of ``TOL``); ``scale`` widens both (e.g. long reductions)."""
    t = TOL[dtype]
    return dict(atol=t["atol"] * scale, rtol=t["rtol"] * scale)


def tol_for_buf(input_dtype: torch.dtype):
    """The tolerance key of an fp32 shrink buffer computed from inputs of ``input_dtype``."""
    return torch.float32 if input_dtype == torch.float32 else "fp32_of_16bit"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, scale: float = 1.0,
                 what: str = "") -> None:
    """``torch.testing.assert_close`` at the dtype's tolerance; prints the worst element first."""
    dtype = dtype or expected.dtype
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if a.numel():
        diff = (a - e).abs()
        i = int(diff.argmax())
        print(f"{what}: worst |diff| {diff.flatten()[i].item():.3e} at flat {i} "
              f"(actual {a.flatten()[i].item():.6g}, expected {e.flatten()[i].item():.6g})")
    torch.testing.assert_close(a, e, **tol(dtype, scale), msg=lambda m: f"{what}: {m}")


def assert_within_lowp_error(actual: torch.Tensor, expected: torch.Tensor, baseline: torch.Tensor, dtype,
                             factor: float = 2.0, what: str = "") -> None:
    """flash-attention's rule, for results whose error is set by rounding fp32 intermediates to 16 bits (a dot on
    tensor cores): the worst error of ``actual`` against the fp32 ``expected`` is at most ``factor`` times the worst
    error of ``baseline`` (plain torch on the same 16-bit operands), plus the dtype's atol."""
    a, e, b = (t.detach().float().cpu() for t in (actual, expected, baseline))
    assert a.shape == e.shape == b.shape, f"{what}: shapes {tuple(a.shape)} {tuple(e.shape)} {tuple(b.shape)}"
    err, base = (a - e).abs().max().item(), (b - e).abs().max().item()
    bound = factor * base + TOL[dtype]["atol"]
    print(f"{what}: worst |diff| {err:.3e}, plain 16-bit torch {base:.3e}, bound {bound:.3e}")
    assert err <= bound, f"{what}: worst error {err:.3e} > {factor} x the 16-bit baseline's {base:.3e} + atol"
