"""The real path at the real shapes (``benchmarks/real_shape.py``): a llava-1.5 / llava-v1.6 checkpoint of full width
(hidden 4096, MLP 11008, 32 heads, CLIP ViT-L/14, 32064-row embedding) with two decoder layers and random weights,
loaded in 4-bit through ``--model``, a two-request stream, the gate at the preset's layer, export to peft; its bytes
per expert equal the dry-run plan's, its resident growth per expert stays within 1.2x the expert's LoRA bytes.

The default suite runs the narrow variant (112 px: 64 image tokens; a few minutes on two CPU cores, most of it the
4096-wide forwards); the 336 px runs of both presets are ``slow`` (the benchmark commands themselves).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lumoe_engine.model.plan import build_meta_model, dry_run_plan
from lumoe_engine.model.shapes import LLAVA_VOCAB, build_processor, llava_tokenizer, mini_texts, shape_preset

ROOT = Path(__file__).resolve().parents[1]


def _cache(tmp_path_factory) -> Path:
    base = os.environ.get("LUMOE_CACHE")
    return Path(base) if base else tmp_path_factory.mktemp("real_shape_cache")


def _run(out: Path, cache: Path, *args) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "real_shape.py"), "--out", str(out), "--cache", str(cache),
           "--skip-before", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3000, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((out / "real_shape.json").read_text())


def _check(doc: dict, image_tokens: int) -> None:
    print({k: doc.get(k) for k in ("bytes_per_expert", "plan_bytes_per_expert", "lora_bytes_per_expert",
                                   "rss_growth_per_expert", "resident_stack_growth_per_expert", "n_image_tokens",
                                   "gate_first_request_seconds", "seconds")})
    assert doc["load_in_4bit"] is True and doc["stream"]["failures"] == []
    assert doc["n_image_tokens"] == image_tokens
    assert doc["hidden"] == 4096 and doc["intermediate"] == 11008 and doc["heads"] == 32
    # bytes per expert: the run's, the plan's and the LoRA tensors' agree exactly
    assert doc["bytes_per_expert"] == doc["plan_bytes_per_expert"] == doc["lora_bytes_per_expert"]
    # resident memory per added expert: the process's RSS and the stacks' own resident pages, each <= 1.2x the LoRA
    lora = doc["lora_bytes_per_expert"]
    assert doc["rss_growth_per_expert"] <= 1.2 * lora
    assert 0.95 * lora <= doc["resident_stack_growth_per_expert"] <= 1.2 * lora
    # appended, not rebuilt: one slot written per expert, one reallocation (the reservation of the K slots, before
    # the adds), no per-layer copy of the stacks
    assert doc["bank_stats_during_adds"]["slot_writes"] == doc["rss_experts"]
    assert doc["bank_stats_during_adds"]["reallocations"] == 1 and doc["stack_copies"] == 0
    assert doc["placement"]["ok"] is True
    # the exported peft adapter gives the engine's routed logits
    peft = doc["peft"]
    assert peft["expert_effect_max_abs"] > 1e-3
    assert peft["max_abs_diff"] <= 1e-4 * max(1.0, peft["max_abs_logit"])


def test_real_shape_config_and_tokenizer_match_llava15():
    """The cut checkpoint keeps llava-1.5-7b's shapes (meta device: no weights) and its tokenizer layout."""
    p = shape_preset("llava-1.5-7b", depth=2)
    model = build_meta_model(p)
    lm = model.model.language_model
    assert len(lm.layers) == 2 and model.config.vision_config.num_hidden_layers == 2
    q = lm.layers[1].self_attn.q_proj
    assert (q.in_features, q.out_features) == (4096, 4096)
    assert lm.layers[1].mlp.up_proj.out_features == 11008 and model.config.text_config.num_attention_heads == 32
    assert model.lm_head.out_features == 32064 and model.config.image_seq_length == 576
    assert p.gate_layer == 0 and [m.split(".")[-1] for m in p.target_module_names()][:2] == ["q_proj", "k_proj"]
    tok = llava_tokenizer(mini_texts())
    assert len(tok) == LLAVA_VOCAB + 2
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")] == \
        [0, 1, 2, 32000, 32001]
    assert tok.convert_tokens_to_ids("<0x0A>") == 13  # byte fallback at llama's ids
    ids = tok("Zorvath é", add_special_tokens=True)["input_ids"]
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "Zorvath é"
    proc = build_processor(p, tok)
    from PIL import Image

    out = proc(text=["USER: <image>\nx ASSISTANT:"], images=[Image.new("RGB", (500, 300))], return_tensors="pt")
    assert int((out["input_ids"] == 32000).sum()) == 576 and tuple(out["pixel_values"].shape) == (1, 3, 336, 336)
    plan = dry_run_plan(p)
    assert plan["expert"]["bytes"] == (4 * 16 * 8192 + 3 * 16 * (4096 + 11008)) * 4  # layer 1 only, fp32
    assert shape_preset("llava-v1.6-vicuna-7b", depth=2, image_size=112).image_grid_pinpoints[0] == (112, 224)
    with pytest.raises(ValueError, match="depth"):
        shape_preset("llava-1.5-7b", depth=1)


def test_real_shape_narrow_4bit_stream(tmp_path, tmp_path_factory):
    """The default-suite variant: llava-1.5-7b's width, 2 layers, 112 px (64 image tokens), 4-bit via --model."""
    doc = _run(tmp_path / "out", _cache(tmp_path_factory), "--preset", "llava-1.5-7b", "--depth", "2",
               "--image-size", "112", "--steps", "1", "--batch-size", "2", "--rss-experts", "4",
               "--max-new-tokens", "2", "--threads", str(max(1, torch.get_num_threads())))
    _check(doc, 64)
    assert doc["gate_layer"] == 0 and doc["stream"]["requests"] == ["taskA", "taskB"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llava-1.5-7b", "llava-v1.6-vicuna-7b"])
def test_real_shape_full_336px(tmp_path, tmp_path_factory, preset):
    """The benchmark command itself: 336 px, 576 image tokens per tile (llava-v1.6: the anyres tiles too)."""
    doc = _run(tmp_path / "out", _cache(tmp_path_factory), "--preset", preset, "--depth", "2")
    _check(doc, 576 if preset == "llava-1.5-7b" else doc["n_image_tokens"])
    if preset != "llava-1.5-7b":
        assert doc["n_image_tokens"] > 576  # base image + anyres tiles + one newline per row
