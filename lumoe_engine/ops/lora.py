"""Grouped multi-LoRA front functions: validate, then run the backend chosen once (``lumoe_engine.ops.dispatch``).

- ``lora_shrink``: ``buf[s, m] = x[m // k] @ A[s, e_m].T`` (rank-masked) for the routed rows, grouped by expert.
- ``lora_expand``: ``y[t, n_s] += sum_j w[t, j] * scales[e] * buf[s, t*k+j] @ B[e, n_s].T``, in place.
- ``lora_shrink_expand``: both in one launch from the routing itself (decode, small T).
- ``lora_weight_grad``: the expert-segmented gradients of A and B (the backward of ``grouped_lora``).

Validation raises ``ValueError`` naming the argument, the expected shape/dtype and what to do. Shapes, dtypes and
devices are checked on the host; the value ranges (``ranks`` in [0, R], ``slice_offsets`` ascending from 0 to N,
``ids`` in [-1, E)) cost one small device synchronisation, skipped with ``validate=False`` (and while a CUDA graph
is being captured).

Legend: T tokens (rows of x), E experts, k top-k, M = T*k routed rows (flat index m = t*k + j), S slices,
H input features, N output features of all slices together, R max rank.
"""
from __future__ import annotations

import torch

from lumoe_engine.ops import dispatch
from lumoe_engine.ops.meta import RoutingMeta

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def get_lora_op(op: str):
    """The implementation of ``op`` for the backend in use (see ``dispatch``)."""
    return dispatch.get_op(op)


# ----------------------------------------------------------------------------------------------------------- checks
def _tensor(value, name: str, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor {what}, got {type(value).__name__}")
    return value


def _device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: on {t.device} but x is on {device}; move every argument to one device")


def _rows_2d(t, name: str, legend: str, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    t = _tensor(t, name, f"{legend} fp32/fp16/bf16")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor {legend}, got shape {tuple(t.shape)}; "
                         "flatten the leading dimensions with .reshape(-1, features)")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported; expected fp32/fp16/bf16")
    if t.shape[0] > 0 and t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name}: rows must be contiguous (stride(1) == 1), got strides {t.stride()}; "
                         "call .contiguous()")
    return t


def _contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}; call .contiguous()")


def _lora_a(lora_a, x: torch.Tensor) -> tuple[int, int, int]:
    lora_a = _tensor(lora_a, "lora_a", "[S, E, R, H]")
    if lora_a.dim() != 4:
        raise ValueError(f"lora_a: expected a 4-D tensor [S, E, R, H], got shape {tuple(lora_a.shape)}; "
                         "stack one [E, R, H] per slice (a single slice is lora_a[None])")
    s_count, e_count, r_max, h_in = lora_a.shape
    if h_in != x.shape[1]:
        raise ValueError(f"lora_a: expected [S, E, R, H] with H = {x.shape[1]} (x is [T, H] = {tuple(x.shape)}), "
                         f"got {tuple(lora_a.shape)}")
    if s_count < 1 or e_count < 1 or r_max < 1:
        raise ValueError(f"lora_a: expected S, E, R >= 1 in [S, E, R, H], got {tuple(lora_a.shape)}")
    if lora_a.dtype != x.dtype:
        raise ValueError(f"lora_a: expected the dtype of x ({x.dtype}), got {lora_a.dtype}; cast with .to(x.dtype)")
    _contiguous(lora_a, "lora_a")
    _device(lora_a, "lora_a", x.device)
    return s_count, e_count, r_max


def _lora_b(lora_b, e_count: int, r_max: int, device) -> int:
    lora_b = _tensor(lora_b, "lora_b", "[E, N, R]")
    if lora_b.dim() != 3:
        raise ValueError(f"lora_b: expected a 3-D tensor [E, N, R], got shape {tuple(lora_b.shape)}")
    if lora_b.shape[0] != e_count:
        raise ValueError(f"lora_b: expected [E, N, R] with E = {e_count} experts (as in lora_a), "
                         f"got {tuple(lora_b.shape)}")
    if lora_b.shape[2] != r_max:
        raise ValueError(f"lora_b: expected [E, N, R] with R = {r_max} (the max rank of lora_a), "
                         f"got {tuple(lora_b.shape)}")
    if lora_b.dtype not in FLOAT_DTYPES:
        raise ValueError(f"lora_b: dtype {lora_b.dtype} is not supported; expected fp32/fp16/bf16")
    _contiguous(lora_b, "lora_b")
    _device(lora_b, "lora_b", device)
    return lora_b.shape[1]


def _per_expert(t, name: str, e_count: int, dtype: torch.dtype, device) -> None:
    legend = f"[E] {'int32' if dtype == torch.int32 else 'fp32'}"
    t = _tensor(t, name, legend)
    if t.shape != (e_count,):
        raise ValueError(f"{name}: expected {legend} with E = {e_count}, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected {dtype}, got {t.dtype}; cast with .to({dtype})")
    _contiguous(t, name)
    _device(t, name, device)


def _slice_offsets(t, s_count: int, device) -> None:
    t = _tensor(t, "slice_offsets", "[S+1] int32")
    if t.shape != (s_count + 1,):
        raise ValueError(f"slice_offsets: expected [S+1] = [{s_count + 1}] int32 (S = {s_count} slices), "
                         f"got shape {tuple(t.shape)}")
    if t.dtype != torch.int32:
        raise ValueError(f"slice_offsets: expected int32, got {t.dtype}; cast with .int()")
    _contiguous(t, "slice_offsets")
    _device(t, "slice_offsets", device)


def _y(y, num_tokens: int, n_out: int, lora_b: torch.Tensor, device) -> None:
    y = _rows_2d(y, "y", "[T, N]")
    if y.shape != (num_tokens, n_out):
        raise ValueError(f"y: expected [T, N] = [{num_tokens}, {n_out}] (T rows of x, N rows of lora_b), "
                         f"got {tuple(y.shape)}")
    if y.dtype != lora_b.dtype:
        raise ValueError(f"y: expected the dtype of lora_b ({lora_b.dtype}), got {y.dtype}; "
                         "cast lora_b with .to(y.dtype)")
    _device(y, "y", device)


def _meta(meta, num_tokens: int | None, e_count: int | None, device, need_weights: bool = True) -> None:
    if not isinstance(meta, RoutingMeta):
        raise ValueError(f"meta: expected a RoutingMeta (from lumoe_engine.ops.build_routing), "
                         f"got {type(meta).__name__}")
    if not isinstance(meta.ids, torch.Tensor) or meta.ids.dim() != 2:
        raise ValueError("meta: ids are missing or not [T, k]; build it with lumoe_engine.ops.build_routing")
    if num_tokens is not None and meta.num_tokens != num_tokens:
        raise ValueError(f"meta: built for T = {meta.num_tokens} tokens, but x has T = {num_tokens} rows; "
                         "rebuild it with build_routing for this batch")
    if e_count is not None and meta.num_experts != e_count:
        raise ValueError(f"meta: built for E = {meta.num_experts} experts, but the LoRA weights stack "
                         f"E = {e_count}; rebuild it with build_routing(..., num_experts={e_count}, ...)")
    if need_weights and (not isinstance(meta.weights, torch.Tensor) or meta.weights.shape != meta.ids.shape
                         or meta.weights.dtype != torch.float32):
        raise ValueError("meta: weights must be a [T, k] fp32 tensor; build the metadata with "
                         "lumoe_engine.ops.build_routing(weights, ids, ...) (align_by_expert alone leaves it None)")
    if meta.ids.device != device:
        raise ValueError(f"meta: on {meta.ids.device} but x is on {device}; build it on the device of x")


def _values(checks, validate: bool) -> None:
    """Evaluate the value-range checks ``(name, ok_tensor, message)`` with one device synchronisation."""
    if not validate or not checks:
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    oks = torch.stack([ok.reshape(()) for _, ok, _ in checks]).tolist()      # the one synchronisation
    for ok, (name, _, message) in zip(oks, checks):
        if not ok:
            raise ValueError(f"{name}: {message}")


def _rank_check(ranks: torch.Tensor, r_max: int):
    ok = ((ranks >= 0) & (ranks <= r_max)).all()
    return ("ranks", ok, f"every rank must lie in [0, R] = [0, {r_max}] (R: max rank of lora_a [S, E, R, H]); "
            "clamp them or allocate a larger R")


def _slice_check(slice_offsets: torch.Tensor, n_out: int):
    ok = (slice_offsets[0] == 0) & (slice_offsets[-1] == n_out) & (slice_offsets[1:] > slice_offsets[:-1]).all()
    return ("slice_offsets", ok, f"must start at 0, ascend strictly and end at N = {n_out} (rows of lora_b "
            f"[E, N, R]); e.g. [0, n_q, n_q + n_k, N]")


# ----------------------------------------------------------------------------------------------------------- ops
def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: RoutingMeta, ranks: torch.Tensor, *,
                out: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
    """``buf[s, m, :] = x[m // k] @ lora_a[s, e_m].T``; columns r >= ranks[e_m] and rows with e_m = -1 are zero.

    x: [T, H] fp32/fp16/bf16 (rows contiguous); lora_a: [S, E, R, H] dtype of x, contiguous;
    meta: ``build_routing`` of T tokens over E experts; ranks: [E] int32 in [0, R];
    out: [S, M, R] fp32 contiguous (overwritten) or None. Returns buf [S, M, R] fp32.
    """
    x = _rows_2d(x, "x", "[T, H]")
    s_count, e_count, r_max = _lora_a(lora_a, x)
    _meta(meta, x.shape[0], e_count, x.device, need_weights=False)
    _per_expert(ranks, "ranks", e_count, torch.int32, x.device)
    if out is not None:
        expected = (s_count, meta.ids.numel(), r_max)
        out = _tensor(out, "out", "[S, M, R] fp32")
        if tuple(out.shape) != expected or out.dtype != torch.float32:
            raise ValueError(f"out: expected [S, M, R] = {list(expected)} fp32, got {tuple(out.shape)} {out.dtype}")
        _contiguous(out, "out")
        _device(out, "out", x.device)
    _values([_rank_check(ranks, r_max)], validate)
    return get_lora_op("lora_shrink")(x, lora_a, meta, ranks, out=out)


def lora_expand(buf: torch.Tensor, lora_b: torch.Tensor, slice_offsets: torch.Tensor, meta: RoutingMeta,
                scales: torch.Tensor, ranks: torch.Tensor, y: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """``y[t, n_s] += sum_j w[t, j] * scales[e] * buf[s, t*k+j, :r_e] @ lora_b[e, n_s, :r_e].T``, in place.

    Per slice s, ``n_s = slice_offsets[s]:slice_offsets[s+1]``; fp32 accumulation; for k > 1 the k terms are summed
    in a fixed order. Rows whose ids are all -1 stay untouched (bitwise).
    buf: [S, M, R] fp32 contiguous; lora_b: [E, N, R] dtype of y, contiguous; slice_offsets: [S+1] int32 from 0 to
    N; meta: ``build_routing`` of T tokens; scales: [E] fp32; ranks: [E] int32 in [0, R];
    y: [T, N] fp32/fp16/bf16 (rows contiguous). Returns y.
    """
    buf = _tensor(buf, "buf", "[S, M, R] fp32")
    if buf.dim() != 3 or buf.dtype != torch.float32:
        raise ValueError(f"buf: expected a 3-D fp32 tensor [S, M, R] (from lora_shrink), "
                         f"got shape {tuple(buf.shape)} {buf.dtype}")
    _contiguous(buf, "buf")
    s_count, m_rows, r_max = buf.shape
    device = buf.device
    e_count = lora_b.shape[0] if isinstance(lora_b, torch.Tensor) and lora_b.dim() == 3 else 0
    n_out = _lora_b(lora_b, e_count, r_max, device)
    _meta(meta, None, e_count, device)
    num_tokens = meta.num_tokens
    _y(y, num_tokens, n_out, lora_b, device)
    if m_rows != meta.ids.numel():
        raise ValueError(f"buf: expected [S, M, R] with M = T*k = {meta.ids.numel()} routed rows, "
                         f"got {tuple(buf.shape)}")
    _slice_offsets(slice_offsets, s_count, device)
    _per_expert(scales, "scales", e_count, torch.float32, device)
    _per_expert(ranks, "ranks", e_count, torch.int32, device)
    _values([_rank_check(ranks, r_max), _slice_check(slice_offsets, n_out)], validate)
    return get_lora_op("lora_expand")(buf, lora_b, slice_offsets, meta, scales, ranks, y)


def lora_shrink_expand(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slice_offsets: torch.Tensor,
                       ids: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                       y: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """``y[t, n_s] += sum_j w[t, j] * scales[e] * (x[t] @ lora_a[s, e, :r_e].T) @ lora_b[e, n_s, :r_e].T``, in place.

    The result of ``lora_shrink`` then ``lora_expand``, in one launch, from the routing itself (for small T).
    x: [T, H]; lora_a: [S, E, R, H] dtype of x; lora_b: [E, N, R] dtype of y; slice_offsets: [S+1] int32;
    ids: [T, k] int32 in [-1, E); weights: [T, k] fp32; scales: [E] fp32; ranks: [E] int32; y: [T, N]. Returns y.
    """
    x = _rows_2d(x, "x", "[T, H]")
    s_count, e_count, r_max = _lora_a(lora_a, x)
    n_out = _lora_b(lora_b, e_count, r_max, x.device)
    _y(y, x.shape[0], n_out, lora_b, x.device)
    ids = _tensor(ids, "ids", "[T, k] int32")
    if ids.dim() != 2 or ids.shape[0] != x.shape[0] or ids.dtype != torch.int32:
        raise ValueError(f"ids: expected [T, k] int32 with T = {x.shape[0]} (rows of x), "
                         f"got {tuple(ids.shape)} {ids.dtype}")
    _contiguous(ids, "ids")
    _device(ids, "ids", x.device)
    weights = _tensor(weights, "weights", "[T, k] fp32")
    if weights.shape != ids.shape or weights.dtype != torch.float32:
        raise ValueError(f"weights: expected [T, k] = {list(ids.shape)} fp32 (the shape of ids), "
                         f"got {tuple(weights.shape)} {weights.dtype}")
    _contiguous(weights, "weights")
    _device(weights, "weights", x.device)
    _slice_offsets(slice_offsets, s_count, x.device)
    _per_expert(scales, "scales", e_count, torch.float32, x.device)
    _per_expert(ranks, "ranks", e_count, torch.int32, x.device)
    checks = [_rank_check(ranks, r_max), _slice_check(slice_offsets, n_out)]
    if ids.numel():
        checks.append(("ids", ((ids >= -1) & (ids < e_count)).all(),
                       f"values must lie in [-1, E) = [-1, {e_count}) (-1 = no expert)"))
    _values(checks, validate)
    return get_lora_op("lora_shrink_expand")(x, lora_a, lora_b, slice_offsets, ids, weights, scales, ranks, y)


def lora_weight_grad(x: torch.Tensor, dy: torch.Tensor, buf_x: torch.Tensor, buf_dy: torch.Tensor,
                     slice_offsets: torch.Tensor, meta: RoutingMeta, scales: torch.Tensor, ranks: torch.Tensor, *,
                     need_a: bool = True, need_b: bool = True, validate: bool = True):
    """Expert-segmented gradients of the stacked LoRA weights (``c_m = w[m] * scales[e_m]``, r < ranks[e]):
    ``grad_a[s, e, r] = sum_{m: e_m = e} c_m * buf_dy[s, m, r] * x[m // k]`` and
    ``grad_b[e, n, r] = sum_{m: e_m = e} c_m * dy[m // k, n] * buf_x[s(n), m, r]``; experts without rows get 0.

    x: [T, H]; dy: [T, N] (gradient of the LoRA output); buf_x, buf_dy: [S, M, R] fp32 contiguous;
    slice_offsets: [S+1] int32; meta: ``build_routing`` of T tokens; scales: [E] fp32; ranks: [E] int32.
    Returns ``(grad_a [S, E, R, H] dtype of x or None, grad_b [E, N, R] dtype of dy or None)``.
    """
    x = _rows_2d(x, "x", "[T, H]")
    dy = _rows_2d(dy, "dy", "[T, N]")
    if dy.shape[0] != x.shape[0] or dy.device != x.device:
        raise ValueError(f"dy: expected [T, N] with T = {x.shape[0]} on {x.device}, got {tuple(dy.shape)} "
                         f"on {dy.device}")
    for name, b in (("buf_x", buf_x), ("buf_dy", buf_dy)):
        b = _tensor(b, name, "[S, M, R] fp32")
        if b.dim() != 3 or b.dtype != torch.float32 or b.shape != buf_dy.shape:
            raise ValueError(f"{name}: expected [S, M, R] fp32 like buf_dy {tuple(buf_dy.shape)}, "
                             f"got {tuple(b.shape)} {b.dtype}")
        _contiguous(b, name)
        _device(b, name, x.device)
    s_count, m_rows, r_max = buf_dy.shape
    _meta(meta, x.shape[0], None, x.device)
    e_count = meta.num_experts
    if m_rows != meta.ids.numel():
        raise ValueError(f"buf_dy: expected M = T*k = {meta.ids.numel()} rows, got {tuple(buf_dy.shape)}")
    _slice_offsets(slice_offsets, s_count, x.device)
    _per_expert(scales, "scales", e_count, torch.float32, x.device)
    _per_expert(ranks, "ranks", e_count, torch.int32, x.device)
    _values([_rank_check(ranks, r_max), _slice_check(slice_offsets, dy.shape[1])], validate)
    return get_lora_op("lora_weight_grad")(x, dy, buf_x, buf_dy, slice_offsets, meta, scales, ranks,
                                           need_a=need_a, need_b=need_b)
