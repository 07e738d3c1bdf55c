"""Tolerances by dtype, in one place (Punica / vLLM practice), and a comparison that prints the worst mismatch."""
import torch

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    """atol/rtol for ``dtype``; ``scale`` widens both (e.g. for long reductions)."""
    t = TOL[dtype]
    return dict(atol=t["atol"] * scale, rtol=t["rtol"] * scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0,
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
