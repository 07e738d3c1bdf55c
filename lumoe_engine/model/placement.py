"""Where each rank's tensors live: the base model, the expert bank's stacks, the gate and the trainable LoRA all on
the rank's own device, in the base's compute dtype (the LoRA's master weights in fp32).

Under the ``deepspeed`` (or ``torchrun``) launcher every process gets ``LOCAL_RANK``; its device is
``cuda:LOCAL_RANK`` when CUDA is there, else the CPU. ``load_model`` loads the base straight onto that device
(``device_map={"": device}``, 4-bit or not), so no rank ever touches another rank's GPU; the bank and the gate are
then created (or moved) onto the device the model's weights are on (``model_device``), with the dtype the base
computes in (``compute_dtype``: a 4-bit base's ``bnb_4bit_compute_dtype``, else its floating weights' dtype), so a
wrapped linear reads the bank's stacks as views (no per-layer copy) and the gate routes without moving its state.

``placement_report`` is the bookkeeping the tests and the runs check: every object's device and dtype, and whether
all of them are on the rank's device.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def local_rank() -> int:
    """``LOCAL_RANK`` of this process (0 outside a launcher)."""
    v = os.environ.get("LOCAL_RANK", "")
    return int(v) if v.strip() else 0


def local_device() -> torch.device:
    """The device this rank owns: ``cuda:LOCAL_RANK`` with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def model_device(model) -> torch.device:
    """The device of the model's weights (the first parameter's)."""
    return next(model.parameters()).device


def _quantized_types() -> tuple:
    try:
        import bitsandbytes as bnb

        return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except Exception:  # bitsandbytes missing or broken: nothing is quantised
        return ()


def compute_dtype(model) -> torch.dtype:
    """The dtype the base computes in: the compute dtype of its 4-bit linears, else its first floating weight's."""
    types = _quantized_types()
    for m in model.modules():
        if types and isinstance(m, types):
            cd = getattr(m, "compute_dtype", None)
            if isinstance(cd, torch.dtype):
                return cd
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def is_quantized(model) -> bool:
    """Whether some linear of ``model`` is a bitsandbytes quantised linear (its weight cannot absorb a LoRA)."""
    types = _quantized_types()
    return bool(types) and any(isinstance(m, types) for m in model.modules())


def placement_report(model, bank=None, gate=None, trainable=None) -> dict:
    """Devices and dtypes of the model, the bank's stacks, the gate's state and a trainable expert's parameters,
    with ``ok``: every one of them on the rank's device (``local_device``). JSON-serialisable."""
    want = local_device()
    doc: dict = {"local_rank": local_rank(), "device": str(want), "model": str(model_device(model)),
                 "compute_dtype": str(compute_dtype(model)).replace("torch.", "")}
    devices = [model_device(model)]
    if bank is not None:
        doc["bank"] = str(bank.device)
        doc["bank_dtype"] = str(bank.dtype).replace("torch.", "")
        devices.append(bank.device)
        stacks = {str(t.device) for m in bank.modules for t in bank.stacked(m)[:2]}
        doc["bank_stacks"] = sorted(stacks)
        devices += [torch.device(d) for d in stacks]
    if gate is not None:
        gd = gate_device(gate)
        doc["gate"] = str(gd)
        devices.append(gd)
    if trainable is not None:
        ds = {str(p.device) for p in trainable.parameters()}
        doc["lora_params"] = sorted(ds)
        doc["lora_dtype"] = sorted({str(p.dtype).replace("torch.", "") for p in trainable.parameters()})
        devices += [torch.device(d) for d in ds]
    doc["ok"] = all(_same(d, want) for d in devices)
    return doc


def gate_device(gate) -> torch.device:
    """The device of the gate's stacked heads (``Gate.weight``)."""
    return gate.weight.device


def _same(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    return a.type != "cuda" or (a.index or 0) == (b.index or 0)


def place_gate(gate, model, device: Optional[torch.device] = None):
    """The gate moved onto the model's device (or ``device``); returns it."""
    return gate.to(device if device is not None else model_device(model))


__all__ = ["local_rank", "local_device", "model_device", "compute_dtype", "is_quantized", "placement_report",
           "gate_device", "place_gate"]
