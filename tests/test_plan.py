"""The large-model path without weights: presets -> meta-device architecture -> parameter and memory plan, and the
DeepSpeed config it would use (parsed by DeepSpeed's own config class on CPU).

Legend: H hidden, I MLP width, r LoRA rank, P parameters.
"""
import json
import math
import time

import pytest
import torch

from lumoe_engine.model.plan import build_meta_model, dry_run_plan, format_plan, main, nf4_bytes
from lumoe_engine.model.presets import RUN_PRESETS, get_run_preset
from lumoe_engine.unlearn.ds_config import build_ds_config, launched_by_deepspeed


@pytest.fixture(scope="module")
def plan7():
    t0 = time.perf_counter()
    plan = dry_run_plan("llava-1.5-7b")
    plan["_wall"] = time.perf_counter() - t0
    return plan


def test_7b_plan_params_and_speed(plan7):
    print(f"7B plan: {plan7['_wall']:.2f} s wall, meta construction {plan7['build_seconds']:.2f} s")
    assert plan7["build_seconds"] < 10
    assert plan7["_wall"] < 45  # shared 2-core machine; typically a few seconds
    P = plan7["params"]
    print(P)
    assert abs(P["total"] - 7.06e9) / 7.06e9 < 0.01  # llava-1.5-7b-hf: 7.06B parameters
    assert abs(P["vision"] - 303.5e6) / 303.5e6 < 0.01  # CLIP ViT-L/14-336 vision model
    # projector mlp2x_gelu: 1024 -> 4096 -> 4096 with biases
    assert P["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert P["total"] == P["language_model"] + P["vision"] + P["projector"] + P["other"]
    assert P["quantized_linear_modules"] == 32 * 7


def test_7b_bytes_per_expert_by_hand(plan7):
    # layers 16..31 (above gate layer 15), rank 16: q,k,v,o: 4096 -> 4096; gate, up: 4096 -> 11008; down: 11008 -> 4096
    per_layer = 4 * 16 * (4096 + 4096) + 3 * 16 * (4096 + 11008)
    assert plan7["expert"]["wrapped_modules"] == 16 * 7
    assert plan7["expert"]["params"] == 16 * per_layer == 19_988_480
    assert plan7["expert"]["bytes"] == 16 * per_layer * 2
    # ZeRO-2 over 8 GPUs: Adam state 12 B/param / 8
    assert plan7["memory_per_gpu"]["optimizer_state"] == math.ceil(19_988_480 * 12 / 8)


def test_7b_activation_formula_by_hand(plan7):
    a_layer = 2 * (6 * 4096 + 2 * 4096 + 4 * 11008 + 7 * 16)
    T = 8 * 2048
    head = T * 32064 * 8
    assert plan7["activations"]["per_token_per_layer"] == a_layer
    assert plan7["activations"]["checkpointing_on"] == T * (16 * 2 * 4096 + a_layer) + head
    assert plan7["activations"]["checkpointing_off"] == T * 16 * a_layer + head
    # gd: forget + retain forwards kept until one backward
    assert plan7["activations"]["per_gpu"] == 2 * plan7["activations"]["checkpointing_on"]
    M = plan7["memory_per_gpu"]
    parts = ("base", "resident_experts", "trained_expert_weights", "optimizer_state", "gradients", "zero_buckets",
             "activations", "runtime_allowance")
    assert M["total"] == sum(M[k] for k in parts)
    assert M["fits"] and M["total"] < 80e9


def test_plan_has_ds_config_that_deepspeed_parses(plan7):
    from deepspeed.runtime.config import DeepSpeedConfig

    p = get_run_preset("llava-1.5-7b")
    assert plan7["ds_config"] == build_ds_config(p.zero_stage, p.micro_batch, p.grad_accum, p.lr, bf16=True,
                                                 cpu=False)
    c = DeepSpeedConfig(plan7["ds_config"])
    assert c.zero_optimization_stage == p.zero_stage and c.train_micro_batch_size_per_gpu == p.micro_batch
    assert c.bfloat16_config.enabled


def test_meta_model_has_no_storage_and_plan_is_plain_data(plan7):
    model = build_meta_model("llava-1.5-7b")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    json.dumps({k: v for k, v in plan7.items()})  # no tensors inside


def test_multilora_wraps_meta_model_and_trainable_expert_matches():
    from lumoe_engine.model.bank import ExpertBank
    from lumoe_engine.model.multilora import new_trainable_expert, wrap_model

    p = get_run_preset("llava-1.5-7b")
    model = build_meta_model(p)
    ctx = wrap_model(model, ExpertBank(None), targets=p.lora_targets, layers=p.expert_layers)
    assert sorted(ctx.modules) == sorted(p.target_module_names())
    te = new_trainable_expert(ctx, rank=p.lora_rank, alpha=p.lora_alpha, dtype=torch.bfloat16)
    assert sum(t.numel() for t in te.parameters()) == 19_988_480
    assert all(t.is_meta for t in te.parameters())


def test_nf4_bytes_match_bitsandbytes():
    import bitsandbytes.functional as bf

    for shape in ((256, 512), (333, 77), (1000, 1000)):
        w = torch.randn(*shape, dtype=torch.bfloat16)
        q, st = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        s2 = st.state2
        got = sum(t.numel() * t.element_size() for t in (q, st.absmax, st.code, s2.absmax, s2.code))
        got += 4  # the fp32 offset
        print(shape, got, nf4_bytes(w.numel()))
        assert nf4_bytes(w.numel()) == got


def test_all_presets_build_and_fit():
    for name, p in RUN_PRESETS.items():
        plan = dry_run_plan(name)
        assert plan["memory_per_gpu"]["fits"], format_plan(plan)
        assert plan["max_resident_experts"] >= plan["memory_per_gpu"]["resident_expert_count"]
        if p.family == "llava_next":
            assert plan["params"]["other"] == p.lm.hidden  # image_newline
            assert plan["training"]["max_image_tokens"] == 576 + 48 * 48 + 48
        if "13b" in name:
            assert abs(plan["params"]["total"] - 13.35e9) / 13.35e9 < 0.01  # llava-1.5-13b-hf: 13.35B
            assert plan["expert"]["wrapped_modules"] == 20 * 7
    cfg = get_run_preset("llava-1.6-7b").build_config()
    assert type(cfg).__name__ == "LlavaNextConfig" and [336, 672] in cfg.image_grid_pinpoints
    assert get_run_preset("llava-next-13b").name == "llava-1.6-13b"
    with pytest.raises(ValueError, match="expected one of"):
        get_run_preset("llava-2-70b")


def test_format_and_main(plan7, capsys):
    text = format_plan(plan7)
    assert "llava-1.5-7b" in text and "memory per GPU" in text and "fits" in text and "deepspeed" in text
    assert main(["--preset", "llava-1.5-7b", "--resident-experts", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory_per_gpu"]["resident_expert_count"] == 10
    assert main(["--preset", "nope"]) == 2
    assert "expected one of" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- ds_config

@pytest.mark.parametrize("stage", [0, 2, 3])
def test_ds_config_parses_on_cpu(stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = build_ds_config(stage, micro_batch=2, grad_accum=4, lr=3e-4, bf16=True, cpu=True)
    c = DeepSpeedConfig(cfg)
    assert c.zero_optimization_stage == stage
    assert c.train_batch_size == 8 and c.gradient_accumulation_steps == 4
    assert c.optimizer_name == "adamw" and c.optimizer_params["torch_adam"] is True
    assert c.optimizer_params["lr"] == 3e-4
    assert not c.bfloat16_config.enabled  # off on CPU
    assert c.gradient_clipping == 1.0 and c.steps_per_print >= 10 ** 6 and not c.wall_clock_breakdown
    if stage:
        assert c.zero_config.overlap_comm is False


def test_ds_config_gpu_offload_and_overrides():
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = build_ds_config(3, 1, 1, 1e-4, bf16=True, cpu=False, offload=True, gradient_clipping=0.5,
                          zero_optimization={"stage3_prefetch_bucket_size": 1000})
    assert "torch_adam" not in cfg["optimizer"]["params"]
    c = DeepSpeedConfig(cfg)
    assert c.bfloat16_config.enabled and c.gradient_clipping == 0.5
    assert c.zero_config.offload_optimizer.device == "cpu" and c.zero_config.offload_param.device == "cpu"
    assert c.zero_config.prefetch_bucket_size == 1000 and c.zero_config.overlap_comm is True
    # DeepSpeed's own validation sees a misspelt key (the parse is a real check)
    with pytest.raises(Exception, match="overlap_com"):
        DeepSpeedConfig(build_ds_config(2, 1, 1, 1e-4, True, True, zero_optimization={"overlap_com": True}))


def test_ds_config_bad_input():
    with pytest.raises(ValueError, match="stage=4"):
        build_ds_config(4, 1, 1, 1e-4, True, True)
    with pytest.raises(ValueError, match="micro_batch=0"):
        build_ds_config(2, 0, 1, 1e-4, True, True)
    with pytest.raises(ValueError, match="lr="):
        build_ds_config(2, 1, 1, float("nan"), True, True)
    with pytest.raises(ValueError, match="offload=True needs ZeRO stage"):
        build_ds_config(0, 1, 1, 1e-4, True, False, offload=True)


def test_launched_by_deepspeed(monkeypatch):
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert not launched_by_deepspeed()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    assert not launched_by_deepspeed()
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert launched_by_deepspeed()
