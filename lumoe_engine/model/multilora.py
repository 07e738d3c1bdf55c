"""Multi-LoRA linears over the grouped kernels: every wrapped linear adds the experts of each sample's routing.

``y = base(x) + sum_j w[b, j] * scale_e * (x @ A_e^T) @ B_e^T``, with e = ids[b, j] the expert (a slot of the
``ExpertBank``) that sample b's j-th choice routes to, and A_e / B_e that expert's weights for this linear's module
name. The experts' weights are read from the bank (``bank.stacked(name)``: views, no copy) and refreshed when
``bank.version`` changes.

One ``LoRAContext`` per wrapped model holds the routing of the batch in flight: ``ids [B, k]`` (bank slots, -1 = no
expert) and ``weights [B, k]`` fp32 per sample. All tokens of a sample share its routing (prefill: ``B x S`` tokens;
decode: one token per sample); positions outside an optional ``token_mask [B, S]`` (left padding) get -1. The
per-token routing and its ``RoutingMeta`` are built once per forward step (keyed by the step's token shape and the
routing/bank versions) and reused by every wrapped linear of that step, and by later steps of the same shape.

Paths, chosen per call:
- no routing context, no expert in the batch, or the module not in the bank: ``base(x)`` returned untouched (bitwise);
- inference (no autograd needed): the dispatched ``lora_shrink_expand`` (small T, no metadata) or ``lora_shrink`` +
  ``lora_expand`` over the step's metadata, added in place into the base output;
- autograd (training, or gradients wanted through x): ``ops.grouped_lora``, out of place.
A ``TrainableExpert`` in the context (one rank-r LoRA per wrapped module, parameters A/B, fp32 master weights cast to
the base's compute dtype in the forward) is added for every row through ``ops.grouped_lora``, so a new expert trains
through the same kernels it will later be served by. ``set_always(slots)`` applies bank experts to every token of
every forward (the sequential baselines on a 4-bit base: the merge without editing the weights).

The bank should live on the model's device in its compute dtype (``model.placement``): the layers then read its
stacks as views; otherwise each layer keeps a converted copy, rebuilt on every bank change (counted in
``LoRAContext.stack_copies``).

Works over ``nn.Linear`` and bitsandbytes ``Linear4bit`` bases (anything with ``in_features``/``out_features`` that
maps ``[..., H] -> [..., N]``).

Legend: B samples, S positions per sample in the step, T = B*S tokens, k experts per sample, E resident experts,
H input features, N output features, r / R rank / max rank.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from lumoe_engine import ops
from lumoe_engine.model.bank import Expert, ExpertBank

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROJECTOR_TARGETS = ("linear_1", "linear_2")
# Routed rows up to which inference uses the fused shrink+expand (no alignment metadata); above it the grouped
# shrink + expand over the step's metadata. The C++ CPU op groups rows by expert inside the fused op too, so on CPU
# the fused op is used at every size. NOTE: 256 = decode batches; prefill of real prompts goes to the grouped pair.
FUSED_MAX_ROWS = 256


_LINEAR_TYPES: Optional[tuple] = None


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a bitsandbytes Linear4bit / Linear8bitLt (subclasses of nn.Linear in bitsandbytes 0.4x+)."""
    global _LINEAR_TYPES
    if _LINEAR_TYPES is None:
        types: tuple = (nn.Linear,)
        try:
            import bitsandbytes as bnb

            types = types + (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
        except Exception:  # bitsandbytes missing or broken: nn.Linear only
            pass
        _LINEAR_TYPES = types
    return isinstance(module, _LINEAR_TYPES)


# ---------------------------------------------------------------------------------------------------- training hook

@dataclass
class TrainableExpert:
    """A new expert being trained: ``delta_m(x) = (alpha / rank) * (x @ A_m^T) @ B_m^T`` on every listed module,
    applied to every row of the batch through ``ops.grouped_lora`` (gradients reach A, B and x).

    weights: {module_name: (A nn.Parameter [r, H], B nn.Parameter [N, r])}; rank r; alpha (scale = alpha / r).
    """

    rank: int
    alpha: float
    weights: dict[str, tuple[nn.Parameter, nn.Parameter]]

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def parameters(self) -> list[nn.Parameter]:
        return [p for pair in self.weights.values() for p in pair]

    def to_expert(self, expert_id: str, metadata: Optional[Mapping] = None,
                  dtype: Optional[torch.dtype] = None) -> Expert:
        """The trained weights as a bank ``Expert`` (detached copies on the CPU, cast to ``dtype`` if given: the
        base's compute dtype, the dtype the expert is served in)."""
        def out(t):
            t = t.detach().cpu()
            return t.to(dtype) if dtype is not None and t.dtype != dtype else t.clone()

        return Expert(id=expert_id, rank=self.rank, alpha=float(self.alpha),
                      weights={m: (out(a), out(b)) for m, (a, b) in self.weights.items()},
                      metadata=dict(metadata or {}))


def new_trainable_expert(ctx: "LoRAContext", rank: int = 8, alpha: float = 16.0,
                         modules: Optional[Iterable[str]] = None, dtype: Optional[torch.dtype] = None,
                         seed: Optional[int] = None) -> TrainableExpert:
    """A fresh ``TrainableExpert`` over the context's wrapped modules (or ``modules``), initialised as peft does:
    A Kaiming-uniform (a = sqrt(5)), B zero, so the model starts unchanged; on the base weight's device.
    dtype: of the parameters, default fp32 (master weights: a 16-bit base computes the LoRA in its own dtype from
    them, and the optimizer steps in fp32)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
    names = list(modules) if modules is not None else list(ctx.modules)
    unknown = [m for m in names if m not in ctx.modules]
    if unknown:
        raise ValueError(f"modules {unknown[:4]} are not wrapped in this model; wrapped: {list(ctx.modules)[:4]}...")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    weights = {}
    for m in names:
        layer = ctx.modules[m]
        ref = _base_weight_like(layer.base_layer)
        dt = dtype or torch.float32
        a = torch.empty(rank, layer.in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, H]
        a.uniform_(-bound, bound, generator=gen)
        b = torch.zeros(layer.out_features, rank, dtype=torch.float32)
        weights[m] = (nn.Parameter(a.to(device=ref.device, dtype=dt)), nn.Parameter(b.to(device=ref.device, dtype=dt)))
    return TrainableExpert(rank=rank, alpha=float(alpha), weights=weights)


def _base_weight_like(base: nn.Module) -> torch.Tensor:
    """A tensor with the compute device and dtype of a base linear (4-bit: its compute dtype, default fp32)."""
    w = base.weight
    if w.dtype.is_floating_point:
        return w
    compute = getattr(base, "compute_dtype", None) or torch.float32
    return torch.empty(0, dtype=compute, device=w.device)


# ------------------------------------------------------------------------------------------------------ the context

@dataclass
class _Step:
    """Per-token routing of one step shape, built once and shared by every wrapped linear of the step."""

    ids: torch.Tensor            # [T, k] int32 slots, -1 = no expert
    weights: torch.Tensor        # [T, k] fp32
    num_experts: int
    block_m: int
    meta: Optional[ops.RoutingMeta] = None

    def routing_meta(self) -> ops.RoutingMeta:
        if self.meta is None:
            self.meta = ops.build_routing(self.weights, self.ids, self.num_experts, self.block_m, validate=False)
        return self.meta


@dataclass
class _Train:
    ids: torch.Tensor
    weights: torch.Tensor
    meta: ops.RoutingMeta
    scales: torch.Tensor
    ranks: torch.Tensor


class LoRAContext:
    """The routing of the batch in flight, shared by every ``MultiLoRALinear`` of one wrapped model.

    bank: the ``ExpertBank`` whose resident slots the routing ids name. block_m: row block of the grouped kernels.
    Set the routing with ``set_routing`` (or the ``routing`` context manager), clear it with ``clear``.
    """

    def __init__(self, bank: ExpertBank, block_m: int = 16) -> None:
        if not isinstance(bank, ExpertBank):
            raise ValueError(f"bank: expected an ExpertBank, got {type(bank).__name__}")
        self.bank = bank
        self.block_m = int(block_m)
        self.modules: dict[str, MultiLoRALinear] = {}
        self.trainable: Optional[TrainableExpert] = None
        self.sample_ids: Optional[torch.Tensor] = None      # [B, k] int32 slots
        self.sample_weights: Optional[torch.Tensor] = None  # [B, k] fp32
        self.token_mask: Optional[torch.Tensor] = None      # [B, S] bool, False = pad (-1)
        self.image_rows: Optional[torch.Tensor] = None      # [n_img] int64: sample of each image (projector)
        self.active = False                                  # some sample routes to some expert
        self.always: Optional[torch.Tensor] = None          # [k] int32 slots applied to every token (set_always)
        self.stack_copies = 0                                # per-layer copies of bank stacks (device/dtype mismatch)
        self._gen = 0
        self._steps: dict[tuple, _Step] = {}
        self._train_steps: dict[tuple, _Train] = {}

    # ---- routing
    def set_routing(self, ids, weights=None, token_mask: Optional[torch.Tensor] = None,
                    image_rows: Optional[Sequence[int]] = None) -> None:
        """Route the next forward steps: sample b uses experts ``ids[b, :]`` (bank slots, -1 = none) with
        ``weights[b, :]``.

        ids: [B, k] (or [B]) int tensor / nested lists of slots; weights: same shape fp32, default 1.0 where
        ids >= 0 (0 elsewhere); token_mask: [B, S] (1 = real token) — prefill positions outside it get no expert;
        image_rows: the sample of each image in batch order (only for a wrapped projector; default: sample i has
        image i). One host read of the ids (is any expert present?) per call, none per layer.
        """
        if self.always is not None:
            raise ValueError("this context applies always-on experts (set_always); it takes no per-sample routing")
        device = self.bank.device
        ids_t = torch.as_tensor(ids).to(device)
        if ids_t.dim() == 1:
            ids_t = ids_t[:, None]
        if ids_t.dim() != 2 or ids_t.dtype.is_floating_point or ids_t.dtype == torch.bool:
            raise ValueError(f"ids: expected [B, k] integer bank slots (-1 = no expert), got shape "
                             f"{tuple(ids_t.shape)} {ids_t.dtype}")
        n = self.bank.num_resident
        if ids_t.numel():
            lo, hi = (int(v) for v in torch.stack(torch.aminmax(ids_t.long())).tolist())
            if lo < -1 or hi >= n:
                raise ValueError(f"ids: slots must lie in [-1, {n}) (the bank has {n} resident experts; translate "
                                 f"expert ids with bank.ensure_resident), got min {lo} max {hi}")
            active = hi >= 0
        else:
            active = False
        ids_t = ids_t.to(torch.int32).contiguous()
        if weights is None:
            w_t = (ids_t >= 0).to(torch.float32)
        else:
            w_t = torch.as_tensor(weights, dtype=torch.float32).to(device)
            if w_t.dim() == 1:
                w_t = w_t[:, None]
            if w_t.shape != ids_t.shape:
                raise ValueError(f"weights: expected the shape of ids {tuple(ids_t.shape)} ([B, k]), "
                                 f"got {tuple(w_t.shape)}")
            w_t = torch.where(ids_t >= 0, w_t, torch.zeros((), device=device)).contiguous()
        if token_mask is not None:
            token_mask = torch.as_tensor(token_mask).to(device).bool()
            if token_mask.dim() != 2 or token_mask.shape[0] != ids_t.shape[0]:
                raise ValueError(f"token_mask: expected [B, S] with B = {ids_t.shape[0]}, got "
                                 f"{tuple(token_mask.shape)}")
        self.sample_ids, self.sample_weights, self.token_mask = ids_t, w_t, token_mask
        self.image_rows = (torch.as_tensor(list(image_rows), dtype=torch.long, device=device)
                           if image_rows is not None else None)
        self.active = bool(active)
        self._new_generation()

    def set_always(self, slots: Optional[Sequence[int]]) -> None:
        """Apply the bank's experts at ``slots`` (weight 1 each) to every token of every forward, with or without a
        trainable expert, and whatever ``clear`` does (None or [] turns it off): the exact equivalent of merging them
        into the base weights, for a base that cannot absorb them (4-bit). A context with always-on experts takes
        no per-sample routing."""
        if slots is None or len(slots) == 0:
            self.always = None
        else:
            ids = torch.as_tensor(list(slots), dtype=torch.int32)
            n = self.bank.num_resident
            if ids.dim() != 1 or int(ids.min()) < 0 or int(ids.max()) >= n:
                raise ValueError(f"slots: expected resident bank slots in [0, {n}), got {ids.tolist()}")
            self.always = ids.to(self.bank.device)
        self._new_generation()

    @property
    def applies(self) -> bool:
        """Some bank expert applies to the next forward (routed samples, or always-on experts)."""
        return self.active or self.always is not None

    def clear(self) -> None:
        """No routing: every wrapped linear returns its base output (the trainable expert, if any, still applies)."""
        self.sample_ids = self.sample_weights = self.token_mask = self.image_rows = None
        self.active = False
        self._new_generation()

    @contextmanager
    def routing(self, ids, weights=None, token_mask=None, image_rows=None):
        """``set_routing`` for the duration of a ``with`` block, then ``clear``."""
        self.set_routing(ids, weights, token_mask, image_rows)
        try:
            yield self
        finally:
            self.clear()

    def _new_generation(self) -> None:
        self._gen += 1
        self._steps.clear()

    # ---- training hook
    def set_trainable(self, expert: Optional[TrainableExpert]) -> None:
        """Add ``expert`` (or nothing, with None) to every row of every forward, through ``ops.grouped_lora``."""
        if expert is not None:
            if not isinstance(expert, TrainableExpert):
                raise ValueError(f"expert: expected a TrainableExpert, got {type(expert).__name__}")
            unknown = [m for m in expert.weights if m not in self.modules]
            if unknown:
                raise ValueError(f"trainable expert modules {unknown[:4]} are not wrapped in this model")
            for m, (a, b) in expert.weights.items():
                layer = self.modules[m]
                if tuple(a.shape) != (expert.rank, layer.in_features) or \
                        tuple(b.shape) != (layer.out_features, expert.rank):
                    raise ValueError(f"trainable expert, module {m!r}: A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                     f"expected [{expert.rank}, {layer.in_features}] and "
                                     f"[{layer.out_features}, {expert.rank}]")
        self.trainable = expert
        self._train_steps.clear()

    @contextmanager
    def training(self, expert: TrainableExpert):
        """``set_trainable(expert)`` for a ``with`` block."""
        self.set_trainable(expert)
        try:
            yield expert
        finally:
            self.set_trainable(None)

    # ---- per-step routing (built once per step shape)
    def step(self, lead: tuple[int, ...], projector: bool = False) -> Optional[_Step]:
        """The per-token routing for a wrapped input of leading shape ``lead`` ([B, S] or [T]), or None when no
        expert applies. Cached per (shape, routing generation, bank version)."""
        if not self.applies:
            return None
        key = (lead, projector, self.bank.version)
        st = self._steps.get(key)
        if st is None:
            st = self._build_step(lead, projector)
            self._steps[key] = st
        return st

    def _build_step(self, lead: tuple[int, ...], projector: bool) -> _Step:
        if self.always is not None:  # every token: every always-on expert, weight 1
            T, k = math.prod(lead), self.always.numel()
            return _Step(ids=self.always.view(1, k).expand(T, k).contiguous(),
                         weights=torch.ones(T, k, dtype=torch.float32, device=self.always.device),
                         num_experts=max(self.bank.num_resident, 1), block_m=self.block_m)
        ids, w = self.sample_ids, self.sample_weights
        assert ids is not None and w is not None
        if projector:
            rows = self.image_rows if self.image_rows is not None else torch.arange(lead[0], device=ids.device)
            if rows.numel() != lead[0]:
                raise ValueError(f"projector input has {lead[0]} images but image_rows names {rows.numel()}; pass "
                                 f"image_rows= (the sample of each image) to set_routing")
            ids, w = ids[rows], w[rows]
        batch = ids.shape[0]
        if len(lead) >= 2:
            if lead[0] != batch:
                raise ValueError(f"a wrapped linear got a batch of {lead[0]} rows but the routing is for {batch} "
                                 f"samples; set_routing with one row of ids per sample (beam search expands the "
                                 f"batch: repeat the routing)")
            per = math.prod(lead[1:])
            tok_ids = ids.repeat_interleave(per, dim=0)
            tok_w = w.repeat_interleave(per, dim=0)
            if (self.token_mask is not None and not projector and len(lead) == 2
                    and tuple(self.token_mask.shape) == tuple(lead)):
                keep = self.token_mask.reshape(-1, 1)
                tok_ids = torch.where(keep, tok_ids, torch.full_like(tok_ids, -1))
                tok_w = torch.where(keep, tok_w, torch.zeros_like(tok_w))
        else:
            if lead[0] != batch:
                raise ValueError(f"a wrapped linear got {lead[0]} tokens [T, H] but the routing is for {batch} "
                                 f"samples; pass inputs as [B, S, H]")
            tok_ids, tok_w = ids, w
        return _Step(ids=tok_ids.contiguous(), weights=tok_w.contiguous(), num_experts=max(self.bank.num_resident, 1),
                     block_m=self.block_m)

    def train_step(self, num_tokens: int, device) -> _Train:
        """Routing of the trainable expert: every one of ``num_tokens`` rows to expert 0 with weight 1."""
        key = (num_tokens, str(device))
        st = self._train_steps.get(key)
        if st is None:
            ids = torch.zeros(num_tokens, 1, dtype=torch.int32, device=device)
            w = torch.ones(num_tokens, 1, dtype=torch.float32, device=device)
            te = self.trainable
            assert te is not None
            st = _Train(ids=ids, weights=w,
                        meta=ops.build_routing(w, ids, 1, self.block_m, validate=False),
                        scales=torch.tensor([te.scale], dtype=torch.float32, device=device),
                        ranks=torch.tensor([te.rank], dtype=torch.int32, device=device))
            self._train_steps[key] = st
        return st


# ---------------------------------------------------------------------------------------------------- the layer

class MultiLoRALinear(nn.Module):
    """A base linear plus the routed experts of the ``LoRAContext`` (see the module docstring).

    base_layer: ``nn.Linear`` or bitsandbytes ``Linear4bit`` (frozen); name: its full dotted module name (the name
    the bank stores); ctx: the shared context. x: [..., H] -> y: [..., N] in the base output's dtype.
    """

    def __init__(self, base_layer: nn.Module, name: str, ctx: LoRAContext, projector: bool = False) -> None:
        super().__init__()
        if not _is_linear(base_layer):
            raise ValueError(f"{name}: expected nn.Linear or bitsandbytes Linear4bit, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.name = name
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.projector = bool(projector)
        object.__setattr__(self, "_ctx", ctx)  # plain attribute: the context is shared, not a submodule
        self._cache_key: Optional[tuple] = None
        self._cache: Optional[tuple] = None
        self._offsets: dict[torch.device, torch.Tensor] = {}

    @property
    def weight(self):  # code that inspects q_proj.weight (dtype/device checks) keeps working
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in_features={self.in_features}, out_features={self.out_features}"

    def _stacked(self, dtype: torch.dtype, device: torch.device):
        """The bank's (lora_a [1, E, R, H], lora_b [E, N, R], ranks [E], scales [E]) for this module in ``dtype`` on
        ``device`` (views when the bank already matches), or None when no expert adapts this module."""
        bank = self._ctx.bank
        key = (bank.version, dtype, device)
        if self._cache_key != key:
            self._cache_key = key
            if self.name not in bank.module_shapes or bank.num_resident == 0:
                self._cache = None
            else:
                a, b, ranks, scales = bank.stacked(self.name)
                if a.dtype != dtype or a.device != device:
                    # a bank created off the model's device / compute dtype: a full copy per layer per bank change
                    # (create it with model.placement: device=model_device, dtype=compute_dtype)
                    self._ctx.stack_copies += 1
                    a, b = a.to(device=device, dtype=dtype).contiguous(), b.to(device=device, dtype=dtype).contiguous()
                self._cache = (a, b, ranks.to(device), scales.to(device))
        return self._cache

    def _slice_offsets(self, device: torch.device) -> torch.Tensor:
        t = self._offsets.get(device)
        if t is None:
            t = self._offsets[device] = torch.tensor([0, self.out_features], dtype=torch.int32, device=device)
        return t

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        ctx: LoRAContext = self._ctx
        trainable = ctx.trainable is not None and self.name in ctx.trainable.weights
        if not ctx.applies and not trainable:
            return y
        lead = tuple(x.shape[:-1])
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if ctx.applies:
            w = self._stacked(x2.dtype, x2.device)
            step = ctx.step(lead, self.projector) if w is not None else None
            if step is not None:
                lora_a, lora_b, ranks, scales = w
                so = self._slice_offsets(x2.device)
                if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
                    delta = ops.grouped_lora(x2, lora_a, lora_b, so, step.routing_meta(), scales, ranks,
                                             validate=False)
                    y = y + delta.to(y.dtype).view(y.shape)
                else:
                    if lora_b.dtype != y.dtype:  # expand adds into y in the dtype of lora_b
                        lora_b = lora_b.to(y.dtype)
                    if not y.is_contiguous():
                        y = y.contiguous()
                    y2 = y.view(-1, self.out_features)
                    if ops.backend_name() == "cpp" or step.ids.numel() <= FUSED_MAX_ROWS:
                        ops.lora_shrink_expand(x2, lora_a, lora_b, so, step.ids, step.weights, scales, ranks, y2,
                                               validate=False)
                    else:
                        meta = step.routing_meta()
                        buf = ops.lora_shrink(x2, lora_a, meta, ranks, validate=False)
                        ops.lora_expand(buf, lora_b, so, meta, scales, ranks, y2, validate=False)
        if trainable:
            te = ctx.trainable
            a, b = te.weights[self.name]
            tr = ctx.train_step(x2.shape[0], x2.device)
            so = self._slice_offsets(x2.device)
            if a.dtype != x2.dtype:  # fp32 master weights, 16-bit compute (the cast's backward gives fp32 grads)
                a, b = a.to(x2.dtype), b.to(x2.dtype)
            delta = ops.grouped_lora(x2, a[None, None], b[None], so, tr.meta, tr.scales, tr.ranks, validate=False)
            y = y + delta.to(y.dtype).view(y.shape)
        return y


# ---------------------------------------------------------------------------------------------------- wrapping

def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The language model's decoder layer list and its dotted name (``model.language_model.layers`` for
    transformers 5.x LLaVA, ``model.layers`` / ``language_model.model.layers`` for other layouts)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] == "layers" and "vision" not in name:
            if "language_model" in name:
                return name, mod
            if best is None:
                best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no decoder layer list ('...language_model.layers' or "
                         f"'model.layers') found; pass a LLaVA / causal LM model")
    return best


def _projector_name(model: nn.Module) -> Optional[str]:
    for name, _ in model.named_modules():
        if name.split(".")[-1] == "multi_modal_projector":
            return name
    return None


def target_module_names(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS,
                        layers: Optional[Iterable[int]] = None, include_projector: bool = False) -> list[str]:
    """Full dotted names of the linears ``wrap_model`` would wrap (same arguments), in model order."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError("targets: expected at least one short module name, e.g. ('q_proj', 'v_proj')")
    prefix, decoder = find_decoder_layers(model)
    n_layers = len(decoder)
    if layers is None:
        chosen = set(range(n_layers))
    else:
        chosen = set()
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not -n_layers <= i < n_layers:
                raise ValueError(f"layers: {i!r} is not a decoder layer index of this model (0..{n_layers - 1})")
            chosen.add(i % n_layers)
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)$")
    proj = _projector_name(model) if include_projector else None
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, MultiLoRALinear) or not _is_linear(mod):
            continue
        short = name.rsplit(".", 1)[-1]
        m = pat.match(name)
        if m and int(m.group(1)) in chosen and short in targets:
            names.append(name)
        elif proj is not None and name.startswith(proj + ".") and short in PROJECTOR_TARGETS:
            names.append(name)
    if not names:
        raise ValueError(f"no linear named {targets} in decoder layers {sorted(chosen)} under {prefix!r}; check "
                         f"targets against model.named_modules()")
    return names


def wrap_model(model: nn.Module, bank: ExpertBank, targets: Sequence[str] = DEFAULT_TARGETS,
               layers: Optional[Iterable[int]] = None, include_projector: bool = False,
               block_m: int = 16) -> LoRAContext:
    """Replace the target linears of the language model's decoder layers ``layers`` (default: all) — and the
    multimodal projector's linears with ``include_projector`` — by ``MultiLoRALinear`` in place; returns their
    shared ``LoRAContext``. The wrapped base linears are frozen (requires_grad False). Module names stay the full
    dotted names the bank uses; the base weights move to ``<name>.base_layer``. Undo with ``unwrap_model``."""
    if getattr(model, "_lumoe_context", None) is not None:
        raise ValueError("model is already wrapped; call unwrap_model(model) first")
    names = target_module_names(model, targets, layers, include_projector)
    ctx = LoRAContext(bank, block_m=block_m)
    proj = _projector_name(model) if include_projector else None
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        for p in base.parameters():
            p.requires_grad_(False)
        layer = MultiLoRALinear(base, name, ctx, projector=proj is not None and name.startswith(proj + "."))
        setattr(parent, child, layer)
        ctx.modules[name] = layer
    object.__setattr__(model, "_lumoe_context", ctx)
    return ctx


def unwrap_model(model: nn.Module) -> None:
    """Put the base linears back (the inverse of ``wrap_model``); the base weights' requires_grad stays False."""
    ctx: Optional[LoRAContext] = getattr(model, "_lumoe_context", None)
    if ctx is None:
        raise ValueError("model is not wrapped (no wrap_model context on it)")
    for name, layer in ctx.modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    ctx.modules.clear()
    ctx.clear()
    object.__setattr__(model, "_lumoe_context", None)


def get_context(model: nn.Module) -> Optional[LoRAContext]:
    """The ``LoRAContext`` of a wrapped model, or None."""
    return getattr(model, "_lumoe_context", None)


def random_expert(expert_id: str, module_shapes: Mapping[str, tuple[int, int]], rank: int = 8, alpha: float = 16.0,
                  seed: int = 0, std: float = 0.05, dtype: torch.dtype = torch.float32) -> Expert:
    """An expert with random A and B (B non-zero, so it changes the output) on every module of ``module_shapes``
    ({name: (H, N)}): equality tests and throughput benchmarks need experts, not trained ones."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for m, (h_in, h_out) in module_shapes.items():
        a = torch.randn(rank, h_in, generator=gen) / math.sqrt(h_in)
        b = torch.randn(h_out, rank, generator=gen) * std
        weights[m] = (a.to(dtype), b.to(dtype))
    return Expert(id=expert_id, rank=rank, alpha=float(alpha), weights=weights, metadata={"random": True,
                                                                                          "seed": seed})


def module_shapes(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """{name: (H, N)} of the named linears of ``model`` (wrapped or not)."""
    out = {}
    for n in names:
        mod = model.get_submodule(n)
        out[n] = (int(mod.in_features), int(mod.out_features))
    return out
