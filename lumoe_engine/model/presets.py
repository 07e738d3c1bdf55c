"""Run presets for the real LLaVA models on one 8 x A100-80GB node: architecture, 4-bit base, ZeRO, batch, LoRA.

The architecture numbers are the public sizes of the published checkpoints (their config.json on the Hugging Face
hub, llava-hf/*), written here so that a config, a meta-device model and a memory plan exist without any download:

  llava-1.5-7b   Llama-2-7B / Vicuna-7B-v1.5 LM: hidden 4096, 32 layers, 32 heads (no GQA), MLP 11008, vocab 32064
  llava-1.5-13b  Llama-2-13B / Vicuna-13B-v1.5 LM: hidden 5120, 40 layers, 40 heads, MLP 13824, vocab 32064
  vision (all)   CLIP ViT-L/14 at 336 px: hidden 1024, 24 layers, 16 heads, MLP 4096, patch 14 -> 24 x 24 = 576
                 patches, features of the second-to-last layer, CLS dropped ("default")
  projector      mlp2x_gelu: Linear(1024 -> H), GELU, Linear(H -> H)
  llava-1.6-*    LLaVA-NeXT (Vicuna LMs as above): "anyres" -- the image is also cut into 336 px tiles on the best of
                 the grid pinpoints (up to 672 x 672, 1008 x 336, 336 x 1008), each tile 576 tokens, one newline
                 token per row of patches; up to 2928 image tokens per image.

Gate and experts: the gate reads the output of decoder layer ``gate_layer`` (0-based index into the LM's ``layers``,
as ``gate.features``); the experts wrap the target linears of decoder layers ``gate_layer + 1 .. n_layers - 1``, so
the gate's features never depend on the experts and one forward serves both.

Training settings (ZeRO stage, micro batch, accumulation, sequence length) are starting points sized with
``model.plan`` (python -m lumoe_engine.model.plan --preset NAME), not measured runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TARGET_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LM_PREFIX = "model.language_model.layers"  # transformers 5.x LlavaForConditionalGeneration module path
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class LMSizes:
    """Llama decoder sizes."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 32064
    max_positions: int = 4096
    rms_norm_eps: float = 1e-5


@dataclass(frozen=True)
class VisionSizes:
    """CLIP vision tower sizes."""

    hidden: int = 1024
    layers: int = 24
    heads: int = 16
    intermediate: int = 4096
    image_size: int = 336
    patch_size: int = 14
    projection_dim: int = 768

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


LLAMA2_7B = LMSizes(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008)
LLAMA2_13B = LMSizes(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824)
CLIP_L14_336 = VisionSizes()


@dataclass(frozen=True)
class RunPreset:
    """One real model and how to train experts on it.

    family: "llava" (1.5) or "llava_next" (1.6); model_id: the hub id; local_dir: where ``--model`` should point
    (a placeholder: download the checkpoint there). 4-bit: NF4 with double quantisation on the LM's linears,
    compute in bf16; ``quant_storage`` bf16 lets ZeRO-3 partition the packed weights (uint8 cannot be).
    micro_batch: rows per GPU per micro step; grad_accum: micro steps per optimizer step; max_seq_len: tokens per row
    (image tokens included). LoRA: ``lora_rank`` / ``lora_alpha`` on ``lora_targets`` of decoder layers
    ``gate_layer + 1 .. layers - 1`` (the gate reads the output of layer ``gate_layer``).
    """

    name: str
    family: str
    model_id: str
    local_dir: str
    lm: LMSizes
    vision: VisionSizes = CLIP_L14_336
    projector: str = "mlp2x_gelu"
    image_grid_pinpoints: Optional[tuple[tuple[int, int], ...]] = None
    load_in_4bit: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    quant_blocksize: int = 64
    compute_dtype: str = "bfloat16"
    quant_storage: str = "bfloat16"
    zero_stage: int = 2
    micro_batch: int = 4
    grad_accum: int = 2
    lr: float = 1e-4
    gradient_checkpointing: bool = True
    max_seq_len: int = 2048
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    gate_layer: int = 15
    resident_experts: int = 1000
    world_size: int = 8
    gpu: str = "A100-SXM4-80GB"
    gpu_memory_bytes: int = 80 * 10 ** 9  # A100 80GB: 80 GB of HBM2e (about 79.2 GiB usable to CUDA)
    loss: str = "gd"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> "RunPreset":
        if self.family not in ("llava", "llava_next"):
            raise ValueError(f"preset {self.name!r}: family={self.family!r}, expected 'llava' or 'llava_next'")
        if not 0 <= self.gate_layer < self.lm.layers - 1:
            raise ValueError(f"preset {self.name!r}: gate_layer={self.gate_layer}, expected 0..{self.lm.layers - 2} "
                             "(experts go on the layers above it)")
        bad = [t for t in self.lora_targets if t not in _TARGET_PARENT]
        if bad:
            raise ValueError(f"preset {self.name!r}: unknown LoRA targets {bad}; expected names from {LORA_TARGETS}")
        if self.family == "llava_next" and not self.image_grid_pinpoints:
            raise ValueError(f"preset {self.name!r}: llava_next needs image_grid_pinpoints")
        return self

    @property
    def expert_layers(self) -> range:
        """Decoder layers whose target linears carry experts: gate_layer + 1 .. layers - 1."""
        return range(self.gate_layer + 1, self.lm.layers)

    @property
    def image_seq_length(self) -> int:
        """Tokens of the base (resized) image: one per patch, CLS dropped."""
        return self.vision.patches

    @property
    def max_image_tokens(self) -> int:
        """Most tokens one image can fill: 576 (1.5); anyres (1.6): base image + the tiles of the largest grid
        (before unpadding, which only removes tokens) + one newline token per row of patches."""
        if self.family == "llava":
            return self.image_seq_length
        p = self.vision.patch_size
        return self.image_seq_length + max((h // p) * (w // p) + h // p for h, w in self.image_grid_pinpoints)

    def target_module_names(self) -> list[str]:
        """Full dotted names of the linears that carry experts (transformers 5.x LLaVA / LLaVA-NeXT layout)."""
        return [f"{LM_PREFIX}.{i}.{_TARGET_PARENT[t]}.{t}" for i in self.expert_layers for t in self.lora_targets]

    def build_config(self):
        """The ``LlavaConfig`` / ``LlavaNextConfig`` with the published sizes (no download)."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

        lm, v = self.lm, self.vision
        text = LlamaConfig(vocab_size=lm.vocab, hidden_size=lm.hidden, intermediate_size=lm.intermediate,
                           num_hidden_layers=lm.layers, num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads,
                           max_position_embeddings=lm.max_positions, rms_norm_eps=lm.rms_norm_eps,
                           pad_token_id=32001, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        vision = CLIPVisionConfig(hidden_size=v.hidden, intermediate_size=v.intermediate, num_hidden_layers=v.layers,
                                  num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                                  projection_dim=v.projection_dim, hidden_act="quick_gelu", layer_norm_eps=1e-5)
        common = dict(vision_config=vision, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=self.image_seq_length, tie_word_embeddings=False)
        if self.family == "llava":
            return LlavaConfig(**common)
        return LlavaNextConfig(image_grid_pinpoints=[list(p) for p in self.image_grid_pinpoints], **common)

    def model_class(self):
        from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

        return LlavaForConditionalGeneration if self.family == "llava" else LlavaNextForConditionalGeneration

    def to_dict(self) -> dict:
        d = asdict(self)
        d["expert_layers"] = [self.gate_layer + 1, self.lm.layers - 1]
        d["max_image_tokens"] = self.max_image_tokens
        return d


def _p(name, family, model_id, lm, **kw) -> RunPreset:
    return RunPreset(name=name, family=family, model_id=model_id, local_dir=f"models/{model_id.split('/')[-1]}",
                     lm=lm, **kw).validate()


RUN_PRESETS: dict[str, RunPreset] = {p.name: p for p in (
    _p("llava-1.5-7b", "llava", "llava-hf/llava-1.5-7b-hf", LLAMA2_7B,
       micro_batch=8, grad_accum=1, max_seq_len=2048, gate_layer=15),
    _p("llava-1.5-13b", "llava", "llava-hf/llava-1.5-13b-hf", LLAMA2_13B,
       micro_batch=4, grad_accum=2, max_seq_len=2048, gate_layer=19, resident_experts=500),
    _p("llava-1.6-7b", "llava_next", "llava-hf/llava-v1.6-vicuna-7b-hf", LLAMA2_7B,
       image_grid_pinpoints=NEXT_PINPOINTS, micro_batch=4, grad_accum=2, max_seq_len=4096, gate_layer=15),
    _p("llava-1.6-13b", "llava_next", "llava-hf/llava-v1.6-vicuna-13b-hf", LLAMA2_13B,
       image_grid_pinpoints=NEXT_PINPOINTS, micro_batch=2, grad_accum=4, max_seq_len=4096, gate_layer=19,
       resident_experts=500),
)}
ALIASES = {"llava-next-7b": "llava-1.6-7b", "llava-next-13b": "llava-1.6-13b",
           "llava-v1.6-vicuna-7b": "llava-1.6-7b", "llava-v1.6-vicuna-13b": "llava-1.6-13b"}


def get_run_preset(name: str | RunPreset) -> RunPreset:
    """A run preset by name (or alias), or passed through after validation."""
    if isinstance(name, RunPreset):
        return name.validate()
    key = ALIASES.get(name, name)
    if key not in RUN_PRESETS:
        raise ValueError(f"preset={name!r}: expected one of {sorted(RUN_PRESETS)} (aliases {sorted(ALIASES)})")
    return RUN_PRESETS[key]
