"""Expert trainer: one NEW LoRA expert per unlearning request, trained on the frozen base with an unlearning loss.

``train_expert(model, processor, ctx, request, loss_cfg, train_cfg) -> (Expert, stats)``:

1. the request is checked (``check_request``): a non-empty forget set, every image opens, the retain records the loss
   needs; a bad request raises ``RequestError`` before anything is trained;
2. a fresh ``TrainableExpert`` (rank r, alpha; A Kaiming-uniform, B zero) on the context's wrapped modules (the
   layers above the gate layer); the base parameters stay frozen (requires_grad False);
3. ``with ctx.training(expert)``: a fixed budget of ``train_cfg.steps`` optimizer steps. Each step draws a batch of
   forget records (and retain records when the loss uses them) from ``RecordBatches``: seeded epochs over the
   records, images passed through the processor (pixels computed once per image), image+text and text-only rows
   mixed; the unlearning loss (``losses.unlearning_loss``) runs the wrapped model with only the new expert active
   (cost per step does not depend on how many experts the bank holds); the reference forward (NPO, KL, IDK-PO) is
   the same model with the new expert switched off, i.e. the frozen base;
4. ``check_finite`` on every step's loss: nan/inf raises ``NonFiniteLossError`` naming the step and request; the
   expert is dropped (nothing returned, nothing saved);
5. the trained weights come back as a bank ``Expert`` (id = request id) with metadata (method, loss, steps, lr, final
   loss parts, seconds); the caller saves it (``ExpertBank.add``).

Precision: the expert's A/B are fp32 master weights on the base's device; a 16-bit base computes the LoRA in its own
dtype from them (``torch.autocast`` on CUDA), gradients and AdamW stay fp32; the returned ``Expert`` is in the base's
compute dtype (the dtype it is served and planned in).

Optimizer: plain torch AdamW with gradient clipping, or DeepSpeed ZeRO when the process was started by the
``deepspeed`` launcher (``ds_config.launched_by_deepspeed()``) and ``use_deepspeed`` is not False:
``deepspeed.initialize`` over ``ExpertModule`` (a small module holding the expert's A/B and calling the wrapped model),
gloo on CPU / nccl on CUDA; every rank draws the same global batch and trains on its shard of the rows (rows
``rank::world``); gradients are averaged by DeepSpeed. Request-parallel training (``stream.parallel``) calls it with
``use_deepspeed=False`` on every rank for a different request: each trains alone, exactly as one process would.

Letters: B rows of a global batch, W ranks, r LoRA rank, H input features, N output features.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lumoe_engine.data.records import QARecord
from lumoe_engine.data.streams import Request
from lumoe_engine.errors import RequestError
from lumoe_engine.seeding import stable_seed
from lumoe_engine.model.bank import Expert
from lumoe_engine.model.collate import collate, image_token_count, pixel_values_for
from lumoe_engine.model.multilora import LoRAContext, TrainableExpert, new_trainable_expert
from lumoe_engine.unlearn.ds_config import build_ds_config, launched_by_deepspeed
from lumoe_engine.unlearn.losses import (LOSSES, LossConfig, NonFiniteLossError, check_finite, forward_logits,
                                         get_spec, idk_records, unlearning_loss)

logger = logging.getLogger("lumoe_engine.unlearn")

ImageFn = Callable[[QARecord], "object"]


@dataclass
class TrainConfig:
    """How one expert is trained (the same budget for every request: training cost stays flat along a stream).

    steps: optimizer steps per request; lr: AdamW learning rate; rank / alpha: LoRA rank r and alpha (scale alpha/r);
    batch_size: forget rows per step (global: split over DeepSpeed ranks); retain_batch_size: retain rows per step
    (when the loss reads a retain batch); grad_clip: max gradient norm (0 = off); weight_decay: AdamW;
    seed: record order and LoRA init (mixed with the request id); zero_stage: DeepSpeed ZeRO stage when launched by
    ``deepspeed``; progress: tqdm bar.
    """

    steps: int = 40
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    batch_size: int = 16
    retain_batch_size: int = 16
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    zero_stage: int = 2
    progress: bool = True

    def validate(self) -> "TrainConfig":
        for name in ("steps", "rank", "batch_size", "retain_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name}={v!r}: expected an int >= 1")
        for name in ("lr", "alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"TrainConfig.{name}={v!r}: expected a finite number > 0")
        for name in ("grad_clip", "weight_decay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"TrainConfig.{name}={v!r}: expected a finite number >= 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"TrainConfig.zero_stage={self.zero_stage!r}: expected 0, 1, 2 or 3")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------- checks
def loss_reads_retain(loss_cfg: LossConfig) -> Optional[str]:
    """"required" / "optional" (read when retain records exist and retain_weight > 0) / None: whether the loss uses
    a retain batch."""
    spec = get_spec(loss_cfg.name)
    if spec.retain == "required":
        return "required"
    if spec.retain == "optional" and loss_cfg.retain_weight > 0:
        return "optional"
    return None


def check_request(request: Request, loss_cfg: LossConfig, image_fn: Optional[ImageFn] = None) -> None:
    """Raise ``RequestError`` when ``request`` cannot be learned with ``loss_cfg``: no forget record, a record that is
    not a QARecord, an image that will not open (forget or retain records), or a loss that needs retain records the
    request lacks. Every image is opened once here, so that a bad file fails before any training."""
    if not isinstance(request, Request):
        raise RequestError(f"request: expected a streams.Request, got {type(request).__name__}")
    rid = request.id
    if not request.forget:
        raise RequestError(f"request {rid!r}: forget set is empty (entities {list(request.entities)}); add at least "
                           f"one QA pair of the entity to forget")
    bad = [r for r in list(request.forget) + list(request.retain) if not isinstance(r, QARecord)]
    if bad:
        raise RequestError(f"request {rid!r}: forget/retain items must be QARecord, got {type(bad[0]).__name__}")
    if loss_reads_retain(loss_cfg) == "required" and not request.retain:
        raise RequestError(f"request {rid!r}: loss {loss_cfg.name!r} needs retain records but the request has none; "
                           f"add retain QA pairs or use a loss that does not need them (idk, npo, ga)")
    fn = image_fn or _default_image_fn()
    seen = set()
    for r in list(request.forget) + list(request.retain):
        if r.form != "image_text" or (r.image, r.entity) in seen:
            continue
        seen.add((r.image, r.entity))
        try:
            fn(r).convert("RGB")
        except Exception as exc:  # PIL.UnidentifiedImageError, OSError, ValueError ...
            raise RequestError(f"request {rid!r}: image {r.image} of record {r.uid!r} cannot be opened "
                               f"({type(exc).__name__}: {exc}); replace the file or drop the record") from None


def _default_image_fn() -> ImageFn:
    from lumoe_engine.data.mlubench import load_image

    return load_image


# ---------------------------------------------------------------------------------------------------------- loader
class RecordBatches:
    """Endless collate batches of ``records``: seeded shuffled epochs, ``batch_size`` rows per global batch, this
    rank's shard ``rows[rank::world]``; images go through the processor (pixels computed once per image file).

    next(loader) -> (rows: list[QARecord], batch: collate dict with labels). ``with_idk`` adds the refusal copy of
    the same rows (``losses.idk_records``): next(...) -> (rows, batch, idk_batch), the same pixels in both.
    """

    def __init__(self, records: Sequence[QARecord], processor, batch_size: int, seed: int = 0,
                 image_fn: Optional[ImageFn] = None, rank: int = 0, world: int = 1, with_idk: bool = False,
                 with_answers: bool = True, refusals: Optional[Sequence[str]] = None):
        if not records:
            raise ValueError("RecordBatches: records is empty; pass at least one QARecord")
        if batch_size < world:
            raise ValueError(f"RecordBatches: batch_size={batch_size} is smaller than the {world} ranks; every rank "
                             f"needs at least one row (raise batch_size)")
        self.records = list(records)
        self.processor = processor
        self.batch_size = int(batch_size)
        self.rng = random.Random(seed)
        self.image_fn = image_fn or _default_image_fn()
        self.rank, self.world = int(rank), int(world)
        self.with_idk = with_idk
        self.refusals = tuple(refusals) if refusals else None
        self.fixed = image_token_count(processor) is not None
        self._pixels: dict[tuple, torch.Tensor] = {}
        self._order: list[int] = []

    def __iter__(self):
        return self

    def _take(self) -> list[QARecord]:
        rows = []
        while len(rows) < self.batch_size:
            if not self._order:
                self._order = list(range(len(self.records)))
                self.rng.shuffle(self._order)
            rows.append(self.records[self._order.pop()])
        return rows[self.rank::self.world]

    def _key(self, r: QARecord) -> tuple:
        return (r.image, r.entity, r.image_missing)

    def pixel_values(self, rows: Sequence[QARecord]) -> Optional[torch.Tensor]:
        """``[n, C, S, S]`` processed pixels of the image rows of ``rows`` in order (None when there is none)."""
        img = [r for r in rows if r.form == "image_text"]
        if not img:
            return None
        new = {self._key(r): r for r in img if self._key(r) not in self._pixels}
        if new:
            pv = pixel_values_for(self.processor, [self.image_fn(r) for r in new.values()])
            self._pixels.update(zip(new.keys(), pv))
        return torch.stack([self._pixels[self._key(r)] for r in img])

    def collate(self, rows: Sequence[QARecord]) -> dict:
        if self.fixed:
            return collate(rows, self.processor, pixel_values=self.pixel_values(rows))
        return collate(rows, self.processor, image_fn=self.image_fn)

    def __next__(self):
        rows = self._take()
        batch = self.collate(rows)
        if not self.with_idk:
            return rows, batch
        return rows, batch, self.collate(idk_records(rows, self.refusals) if self.refusals else idk_records(rows))


# ------------------------------------------------------------------------------------------------------ the module
class ExpertModule(nn.Module):
    """The new expert's A/B as the parameters of one module whose forward is the unlearning loss of the wrapped model
    (what ``deepspeed.initialize`` wraps: the frozen base stays outside it, unpartitioned and untouched).

    forward(batches) -> (loss scalar, parts dict), ``losses.unlearning_loss(model, batches, loss_cfg, ref)``.
    """

    def __init__(self, expert: TrainableExpert, model: nn.Module, loss_cfg: LossConfig, ref: Callable):
        super().__init__()
        for i, p in enumerate(expert.parameters()):
            self.register_parameter(f"lora_{i}", p)  # the same Parameter objects the context applies
        object.__setattr__(self, "_model", model)   # not a submodule
        object.__setattr__(self, "_ref", ref)
        self.loss_cfg = loss_cfg

    def forward(self, batches: dict):
        return unlearning_loss(self._model, batches, self.loss_cfg, ref=self._ref)


@contextmanager
def expert_off(ctx: LoRAContext):
    """The trainable expert switched off for a ``with`` block (the frozen base's forward); its caches are kept."""
    saved = ctx.trainable
    ctx.trainable = None
    try:
        yield
    finally:
        ctx.trainable = saved


def base_reference(model: nn.Module, ctx: LoRAContext) -> Callable[[dict], torch.Tensor]:
    """batch -> logits of the model with the trainable expert off (no routing: the frozen base)."""
    def ref(batch):
        with expert_off(ctx):
            return forward_logits(model, batch)
    return ref


# ------------------------------------------------------------------------------------------------------ optimizers
class _PlainStep:
    def __init__(self, module: ExpertModule, cfg: TrainConfig):
        self.module = module
        self.params = [p for p in module.parameters()]
        self.cfg = cfg
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def loss(self, batches):
        return self.module(batches)

    def step(self, loss):
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()

    def close(self):
        self.opt = None


class _DeepSpeedStep:
    def __init__(self, module: ExpertModule, cfg: TrainConfig, micro_batch: int):
        import deepspeed

        init_distributed()
        cuda = torch.cuda.is_available()
        ds_cfg = build_ds_config(cfg.zero_stage, micro_batch=max(1, micro_batch), grad_accum=1, lr=cfg.lr,
                                 bf16=cuda and torch.cuda.is_bf16_supported(), cpu=not cuda,
                                 gradient_clipping=cfg.grad_clip,
                                 optimizer={"params": {"weight_decay": cfg.weight_decay}})
        if not cuda and cfg.zero_stage >= 1:
            # gloo has no reduce_scatter: ZeRO falls back to all-reduce + partition
            ds_cfg["zero_optimization"]["reduce_scatter"] = False
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=list(module.parameters()),
                                               config=ds_cfg)

    def loss(self, batches):
        return self.engine(batches)

    def step(self, loss):
        self.engine.backward(loss)
        self.engine.step()

    def close(self):
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()
        self.engine = None


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed for a ``deepspeed``-launched process once (gloo on CPU, nccl on CUDA); returns
    (rank, world size); (0, 1) when not launched by ``deepspeed``."""
    if not launched_by_deepspeed():
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        import deepspeed

        if torch.cuda.is_available():
            import os

            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """A barrier over all ranks (nothing outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """``obj`` from rank 0 on every rank (itself outside torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj) -> list:
    """``obj`` of every rank on rank 0, in rank order ([] on the others); ``[obj]`` outside torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out if dist.get_rank() == 0 else []


def _all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank (one all-reduce when distributed), so all ranks stop together."""
    ok = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if world > 1:
        import torch.distributed as dist

        ok = ok.to(loss.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


# ---------------------------------------------------------------------------------------------------------- train
def train_expert(model: nn.Module, processor, ctx: LoRAContext, request: Request, loss_cfg: LossConfig,
                 train_cfg: TrainConfig, image_fn: Optional[ImageFn] = None, method: str = "lumoe",
                 use_deepspeed: Optional[bool] = None) -> tuple[Expert, dict]:
    """Train a NEW expert for ``request`` on the frozen base (see the module docstring).

    model: the wrapped model (``wrap_model`` / ``LUMoEEngine``), ctx its ``LoRAContext``; the bank's experts are not
    applied during training (the routing is cleared). image_fn: record -> PIL image (default the benchmark loader).
    use_deepspeed: default ``launched_by_deepspeed()``.
    Returns (Expert with id = request.id, stats: loss, steps, seconds, first/final loss parts, rows seen, ranks).
    Raises RequestError (bad request) or NonFiniteLossError (nan/inf loss); nothing is returned then.
    """
    loss_cfg = dataclasses.replace(loss_cfg).validate()
    train_cfg.validate()
    check_request(request, loss_cfg, image_fn)
    ds = launched_by_deepspeed() if use_deepspeed is None else use_deepspeed
    rank, world = init_distributed() if ds else (0, 1)
    seed = stable_seed("expert", train_cfg.seed, request.id) & 0x7FFFFFFF  # 31 bits: every RNG takes it
    spec = get_spec(loss_cfg.name)
    needs_forget = "forget" in spec.policy or "forget" in spec.reference
    needs_idk = "idk" in spec.policy
    use_retain = loss_reads_retain(loss_cfg) is not None and bool(request.retain)
    if not needs_forget and not needs_idk:
        raise ValueError(f"loss {loss_cfg.name!r} reads neither a forget nor an idk batch; expected one of "
                         f"{sorted(LOSSES)}")

    from lumoe_engine.model.placement import compute_dtype

    dtype = compute_dtype(model)
    autocast = (torch.autocast("cuda", dtype=dtype) if torch.cuda.is_available() and dtype in (torch.bfloat16,
                                                                                                 torch.float16)
                else contextlib.nullcontext())
    forget = RecordBatches(request.forget, processor, train_cfg.batch_size, seed, image_fn, rank, world,
                           with_idk=needs_idk, refusals=loss_cfg.refusals())
    retain = (RecordBatches(request.retain, processor, train_cfg.retain_batch_size, seed + 1, image_fn, rank, world)
              if use_retain else None)
    expert = new_trainable_expert(ctx, rank=train_cfg.rank, alpha=train_cfg.alpha, seed=seed)
    model.requires_grad_(False)  # the base is frozen: only the new expert's A/B train
    ctx.clear()  # only the new expert is active: the step cost does not depend on the bank
    module = ExpertModule(expert, model, loss_cfg, base_reference(model, ctx))
    t0 = time.perf_counter()
    history: list[dict] = []
    with ctx.training(expert):
        runner = _DeepSpeedStep(module, train_cfg, train_cfg.batch_size // world) if ds else _PlainStep(module,
                                                                                                        train_cfg)
        try:
            bar = tqdm(range(train_cfg.steps), desc=f"{method} {request.id}", unit="step", leave=False,
                       disable=not train_cfg.progress or rank != 0, mininterval=1.0)
            for step in bar:
                batches: dict = {}
                item = next(forget)
                if needs_idk:
                    _, fb, ib = item
                    batches["idk"] = ib
                    if needs_forget:
                        batches["forget"] = fb
                else:
                    batches["forget"] = item[1]
                if retain is not None:
                    batches["retain"] = next(retain)[1]
                with autocast:  # 16-bit compute on a GPU; the expert's master weights and AdamW stay fp32
                    loss, parts = runner.loss(batches)
                if not _all_finite(loss, world):
                    check_finite(loss, step, request.id, train_cfg.lr)  # raises when this rank's loss is bad
                    raise NonFiniteLossError(f"loss became nan or inf on another rank at step {step} of request "
                                             f"{request.id}; lower lr (now {train_cfg.lr:g}) or use a bounded loss")
                runner.step(loss)
                history.append(parts)
                if step % 5 == 0 or step == train_cfg.steps - 1:
                    bar.set_postfix(loss=f"{parts['loss']:.3f}")
            bar.close()
        finally:
            runner.close()
    seconds = time.perf_counter() - t0
    last = history[-min(5, len(history)):]
    final = {k: round(sum(h[k] for h in last) / len(last), 5) for k in last[0]}
    stats = {"request": request.id, "method": method, "loss": loss_cfg.name, "steps": len(history),
             "lr": train_cfg.lr, "rank": train_cfg.rank, "alpha": train_cfg.alpha, "seconds": round(seconds, 3),
             "first": {k: round(v, 5) for k, v in history[0].items()}, "final": final,
             "n_forget": len(request.forget), "n_retain": len(request.retain) if use_retain else 0,
             "world_size": world, "deepspeed": bool(ds), "zero_stage": train_cfg.zero_stage if ds else None}
    meta = {"request": request.id, "method": method, "loss": loss_cfg.name, "loss_config": dataclasses.asdict(loss_cfg),
            "steps": len(history), "lr": train_cfg.lr, "final": final, "seconds": round(seconds, 3),
            "entities": list(request.entities), "world_size": world, "deepspeed": bool(ds),
            "created": round(time.time(), 3)}
    logger.info("%s expert %s: %s loss %.4f -> %.4f in %d steps, %.1f s (world size %d)", method, request.id,
                loss_cfg.name, history[0]["loss"], final["loss"], len(history), seconds, world)
    return expert.to_expert(request.id, meta, dtype=dtype), stats


class ExpertTrainer:
    """``train_expert`` with its settings held: ``ExpertTrainer(model, processor, ctx, loss_cfg, train_cfg)(request)
    -> (Expert, stats)``."""

    def __init__(self, model: nn.Module, processor, ctx: LoRAContext, loss_cfg: LossConfig,
                 train_cfg: Optional[TrainConfig] = None, image_fn: Optional[ImageFn] = None, method: str = "lumoe"):
        self.model, self.processor, self.ctx = model, processor, ctx
        self.loss_cfg = loss_cfg.validate()
        self.train_cfg = (train_cfg or TrainConfig()).validate()
        self.image_fn, self.method = image_fn, method

    def __call__(self, request: Request) -> tuple[Expert, dict]:
        return train_expert(self.model, self.processor, self.ctx, request, self.loss_cfg, self.train_cfg,
                            image_fn=self.image_fn, method=self.method)


__all__ = ["TrainConfig", "RequestError", "NonFiniteLossError", "RecordBatches", "ExpertModule", "ExpertTrainer",
           "train_expert", "check_request", "loss_reads_retain", "base_reference", "expert_off", "init_distributed",
           "dist_info", "barrier", "broadcast_object", "gather_object"]
