"""Sequential baselines (the MLUBench paper's protocol): the unlearning losses applied request after request to ONE
shared LoRA that is merged into the model's weights after each request; no gate, no bank.

For every request: a fresh LoRA (rank r, alpha; B zero) on the target linears, trained by the same loop and with the
same step budget as a LUMoE expert (``trainer.train_expert``), then merged, ``W += (alpha / r) * B @ A``, into each
base linear. The next request starts from the merged model, so damage accumulates: retained knowledge fades, earlier
forgetting may relapse, and what one modality's edit breaks is broken for every query. That cumulative degradation is
what the stream's metrics show beside LUMoE's.

The reference model of NPO / KL / IDK-PO is the model as it stands before the current request (the trainable LoRA
switched off), as in sequential unlearning.

On a 4-bit base (bitsandbytes NF4 weights cannot absorb a LoRA) the merge is applied without touching the weights:
each request's trained LoRA is added to a bank of the baseline's own, and every earlier request's LoRA stays active
on every token of every forward (``LoRAContext.set_always``, through the same grouped-LoRA op as the experts):
``y = W x + sum_i scale_i * B_i (A_i x)``, which is the merged model's ``(W + sum_i scale_i B_i A_i) x``. The base is
never edited, so a stream's methods share one copy of it.

Letters: r LoRA rank, H input features, N output features of a linear.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

from lumoe_engine.data.streams import Request
from lumoe_engine.model.bank import Expert, ExpertBank
from lumoe_engine.model.multilora import DEFAULT_TARGETS, LoRAContext, TrainableExpert, unwrap_model, wrap_model
from lumoe_engine.unlearn.losses import LOSSES, LossConfig
from lumoe_engine.unlearn.trainer import ImageFn, TrainConfig, train_expert


BASELINES = ("ga", "gd", "kl", "npo", "idk", "idk-po")


def baseline_loss(name: str, **overrides) -> LossConfig:
    """The LossConfig of baseline ``name`` (the paper's losses; retain terms on, weights 1, beta 0.1)."""
    if name not in BASELINES:
        raise ValueError(f"baseline {name!r}: expected one of {BASELINES}")
    assert name in LOSSES
    return LossConfig(name=name, **overrides).validate()


@torch.no_grad()
def merge_expert(ctx: LoRAContext, expert: Union[Expert, TrainableExpert]) -> int:
    """Add the expert into the base weights: ``W_m += scale * B_m @ A_m`` for every module m it adapts (the wrapped
    linears of ``ctx``). W: [N, H], B: [N, r], A: [r, H]. Returns the number of merged modules.

    Only full-precision bases can absorb a LoRA: a 4-bit (bitsandbytes) base raises ValueError (``SequentialBaseline``
    keeps the LoRAs active instead there).
    """
    weights = expert.weights
    scale = float(expert.scale)
    for name in weights:
        if name not in ctx.modules:
            raise ValueError(f"merge_expert: module {name!r} is not wrapped in this model; wrapped: "
                             f"{list(ctx.modules)[:3]}...")
        w = ctx.modules[name].base_layer.weight
        if not w.dtype.is_floating_point:
            raise ValueError(f"merge_expert: {name} has a {w.dtype} (quantised) weight; the sequential baselines merge "
                             f"each request's LoRA into the weights and need a full-precision base (drop "
                             f"--load-in-4bit for the baselines)")
    for name, (a, b) in weights.items():
        w = ctx.modules[name].base_layer.weight
        delta = scale * (b.detach().to(w.device, torch.float32) @ a.detach().to(w.device, torch.float32))  # [N, H]
        w.add_(delta.to(w.dtype))
    return len(weights)


MERGES = ("auto", "weights", "active")  # how a request's LoRA joins the model (SequentialBaseline.merge)


class SequentialBaseline:
    """A baseline method over one model: ``learn(request)`` trains a fresh LoRA with the method's loss and merges it.

    model: the model to edit (in place: pass a copy of the taught base; a 4-bit base is not edited);
    method: one of ``BASELINES``; layers: decoder layers whose target linears carry the shared LoRA (default: all of
    them, as the paper's LoRA); loss_cfg: default ``baseline_loss(method)``; train_cfg: the same budget as the LUMoE
    experts; merge: "weights" (``W += scale * B @ A``), "active" (the LoRAs of earlier requests stay active on every
    token: the merge without editing the weights, module docstring), "auto" (default): "active" on a quantised base,
    else "weights".
    """

    def __init__(self, model: nn.Module, processor, method: str, loss_cfg: Optional[LossConfig] = None,
                 train_cfg: Optional[TrainConfig] = None, image_fn: Optional[ImageFn] = None,
                 layers: Optional[Iterable[int]] = None, targets=DEFAULT_TARGETS, merge: str = "auto"):
        from lumoe_engine.model.placement import compute_dtype, is_quantized, model_device

        self.loss_cfg = loss_cfg or baseline_loss(method)
        if self.loss_cfg.name != method:
            raise ValueError(f"baseline {method!r}: loss_cfg.name is {self.loss_cfg.name!r}; they must agree")
        if merge not in MERGES:
            raise ValueError(f"merge={merge!r}: expected one of {MERGES}")
        self.model, self.processor, self.method = model, processor, method
        self.train_cfg = (train_cfg or TrainConfig()).validate()
        self.image_fn = image_fn
        self.merge = ("active" if is_quantized(model) else "weights") if merge == "auto" else merge
        model.requires_grad_(False)
        bank = ExpertBank(None, device=model_device(model), dtype=compute_dtype(model))
        self.ctx = wrap_model(model, bank, targets=targets, layers=layers)
        self.merged = 0

    def learn(self, request: Request) -> dict:
        """Train this request's LoRA on the current (merged) model, then merge it. Returns the training stats (plus
        ``merged_modules``). On RequestError / NonFiniteLossError nothing is merged: the model is unchanged."""
        expert, stats = train_expert(self.model, self.processor, self.ctx, request, self.loss_cfg, self.train_cfg,
                                     image_fn=self.image_fn, method=self.method)
        if self.merge == "weights":
            stats["merged_modules"] = merge_expert(self.ctx, expert)
        else:
            expert.id = f"{self.method}-{self.merged:05d}"
            self.ctx.bank.add(expert)
            self.ctx.set_always(range(self.ctx.bank.num_resident))
            stats["merged_modules"] = len(expert.weights)
        self.merged += 1
        return stats

    def close(self) -> None:
        """Put the plain linears back (merged weights stay; LoRAs kept active are dropped with the wrapping)."""
        self.ctx.set_always(None)
        unwrap_model(self.model)


class SequentialRunner:
    """A sequential baseline as a stream driver's runner (``stream.driver.run_method``): ``learn`` one request (train
    and merge, ``SequentialBaseline``), ``answer`` the step's evaluation queries with the merged model (no routing).
    A baseline is not resumable mid-stream (its LoRAs are merged into the weights): an unfinished one is rerun from
    its first request, so ``replay`` does nothing.

    model: the model to edit in place (a copy of the taught base); validate: a check of each request before it is
    learned (raise RequestError to refuse it); max_new / batch_size: the evaluation's answer length and batch;
    layers: decoder layers carrying the shared LoRA (the stream gives LUMoE's placement: the layers above the gate).
    """

    def __init__(self, model: nn.Module, processor, method: str, loss_cfg: LossConfig, train_cfg: TrainConfig,
                 max_new: int, batch_size: int, validate=None, image_fn: Optional[ImageFn] = None,
                 layers: Optional[Iterable[int]] = None):
        self.name = method
        self.model, self.processor = model, processor
        self.max_new, self.batch_size, self.validate = max_new, batch_size, validate
        self.image_fn = image_fn
        self.base = SequentialBaseline(model, processor, method, loss_cfg, train_cfg, image_fn=image_fn,
                                       layers=layers)

    def replay(self, records) -> None:
        if records:
            raise ValueError(f"baseline {self.name!r} cannot continue mid-stream (its LoRAs are merged into the "
                             f"weights): rerun it from its first request")

    def new_record(self, step: int, req: Request) -> dict:
        return {"step": step, "method": self.name, "request": req.id, "train_seconds": None}

    def learn(self, step: int, req: Request, rec: dict, cost: dict) -> None:
        if self.validate is not None:
            self.validate(req)
        stats = self.base.learn(req)
        cost["train_seconds"] = rec["train_seconds"] = stats["seconds"]

    def answer(self, queries) -> tuple[dict, None, dict]:
        from lumoe_engine.data.mlubench import load_image
        from lumoe_engine.model.collate import generate_answers

        texts = generate_answers(self.model, self.processor, queries, self.max_new, batch_size=self.batch_size,
                                 image_fn=self.image_fn or load_image)
        return {r.uid: t for r, t in zip(queries, texts)}, None, {}

    def record_extra(self) -> dict:
        return {}

    def after_step(self, step: int, req: Request, failure) -> None:
        pass

    def gate_config(self) -> None:
        return None

    def close(self) -> None:
        self.base.close()


__all__ = ["BASELINES", "MERGES", "baseline_loss", "merge_expert", "SequentialBaseline", "SequentialRunner"]
