"""Load any Hugging Face LLaVA / LLaVA-NeXT checkpoint directory (a real llava-1.5 / llava-v1.6 model, or a saved tiny
LLaVA) with its processor, optionally as a 4-bit NF4 base (bitsandbytes).

4-bit: the language model's linears are NF4 (double quantisation, compute in ``dtype``); the vision tower, the
projector and ``lm_head`` stay in ``dtype`` (QLoRA practice for LLaVA: they are small and precision-sensitive).
On CPU, bitsandbytes' ``Linear4bit`` repacks its weight for an AVX512-bf16 fast path the first time it runs in eval
mode without gradients, and gradients through that packed weight are then silently dropped; ``load_model`` turns the
fast path off on every ``Linear4bit`` (``support_avx512bf16_for_cpu = False``) so a frozen 4-bit base can serve eval
forwards and LoRA training in turn.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger("lumoe_engine.model")

MODEL_TYPES = ("llava", "llava_next")
SKIP_4BIT = [".*vision_tower", ".*multi_modal_projector", "lm_head"]  # regexes matched from the module name start


def attn_implementation() -> str:
    """``flash_attention_2`` when flash-attn imports and CUDA is there, else ``sdpa``."""
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except Exception:  # not installed or built for another torch
            pass
    return "sdpa"


def disable_cpu_bf16_repack(model: torch.nn.Module) -> int:
    """Set ``support_avx512bf16_for_cpu = False`` on every bitsandbytes ``Linear4bit`` of ``model``; returns the
    number of such layers."""
    try:
        import bitsandbytes as bnb
    except Exception:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _model_class(model_type: str):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    return {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}[model_type]


def load_model(model_dir: str | Path, load_in_4bit: bool = False, dtype: Optional[torch.dtype] = None,
               device_map=None):
    """``(model, processor)`` from a checkpoint directory holding config.json, weights and the processor files.

    dtype: weights (and 4-bit compute) dtype; default fp32 on CPU, bf16 on CUDA.
    device_map: passed to ``from_pretrained`` (default on CUDA: ``{"": LOCAL_RANK}``, this rank's own GPU, 4-bit or
    not: under the ``deepspeed`` launcher every rank loads its own copy onto its own device; without CUDA: the CPU).
    The model is returned in eval mode; its generation config pads with the tokenizer's pad (or eos) token.
    """
    from transformers import AutoProcessor, BitsAndBytesConfig

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: --model expects a Hugging Face LLaVA checkpoint directory "
                                "(config.json, weights, processor files)")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{cfg_path}: model_type={model_type!r}, expected one of {MODEL_TYPES} (LLaVA / LLaVA-NeXT)")
    cuda = torch.cuda.is_available()
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation())
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=SKIP_4BIT)
    if device_map is None and cuda:
        from lumoe_engine.model.placement import local_device

        device_map = {"": local_device().index}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = _model_class(model_type).from_pretrained(str(model_dir), **kwargs)
    n = disable_cpu_bf16_repack(model)  # also a checkpoint saved already quantized
    if n:
        logger.info("loaded %s with %d 4-bit NF4 Linear4bit layers", model_dir, n)
    processor = AutoProcessor.from_pretrained(str(model_dir))
    tok = getattr(processor, "tokenizer", None)
    if tok is not None and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok is not None:
        tok.padding_side = "left"
        gc = model.generation_config
        gc.pad_token_id = tok.pad_token_id
        if gc.eos_token_id is None:
            gc.eos_token_id = tok.eos_token_id
    model.eval()
    return model, processor


def checkpoint_fingerprint(model_dir: str | Path, load_in_4bit: bool = False) -> str:
    """A short hash naming a checkpoint as loaded: its config.json, the names, sizes and modification times of its
    weight files, and whether it is loaded in 4-bit (the key of its cached answers)."""
    import hashlib

    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(b"4bit" if load_in_4bit else b"full")
    return h.hexdigest()[:20]
