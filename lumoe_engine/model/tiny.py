"""The tiny LLaVA of the embedded default: ``transformers.LlavaForConditionalGeneration`` from a config (CLIP vision
tower + Llama LM), the same classes as the real llava-1.5 path, small enough to be taught on two CPU cores.

Image tokens (transformers 5.x LLaVA): the vision tower turns a ``S x S`` image into ``(S/P)^2`` patch states plus a
CLS state; with ``vision_feature_select_strategy="default"`` the CLS state is dropped, so each image fills
``image_seq_length = (S/P)^2`` positions. The processor expands every ``<image>`` in the text to that many
``<image>`` tokens (``num_additional_image_tokens=1`` counts the CLS, ``"default"`` removes it again), and the model
scatters the projected patch states into those positions in order. ``vision_feature_layer=-1``: the last vision
layer feeds the projector (with a 2-layer tower, llava's -2 would leave the last layer unused).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from lumoe_engine.model.tokenizer import CHAT_TEMPLATE, IMAGE


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of a tiny LLaVA. ``image_size`` must be a multiple of ``patch_size``; heads must divide hidden sizes."""

    name: str
    hidden: int = 256            # LM hidden size
    layers: int = 4              # LM decoder layers
    heads: int = 4               # LM attention heads
    kv_heads: int = 2            # LM key/value heads (grouped-query attention)
    intermediate: int = 512      # LM MLP width
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 256
    image_size: int = 32
    patch_size: int = 8
    max_positions: int = 512

    @property
    def image_tokens(self) -> int:
        """Positions one image fills in the sequence: one per patch (the CLS state is dropped)."""
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"preset {self.name!r}: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        for h, n, what in ((self.hidden, self.heads, "hidden/heads"), (self.vision_hidden, self.vision_heads,
                                                                       "vision_hidden/vision_heads")):
            if h % n:
                raise ValueError(f"preset {self.name!r}: {what} = {h}/{n} is not an integer")
        if self.heads % self.kv_heads:
            raise ValueError(f"preset {self.name!r}: heads {self.heads} not a multiple of kv_heads {self.kv_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, TinyPreset] = {
    # unit tests: builds and runs in milliseconds
    "micro": TinyPreset("micro", hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vision_hidden=32,
                        vision_layers=1, vision_heads=2, vision_intermediate=64, image_size=16, patch_size=8),
    # the embedded default: 36 entities x 5 facts taught in a few minutes on 2 CPU cores
    "tiny": TinyPreset("tiny"),
    # more capacity (more entities, long real answers); several times slower to teach
    "small": TinyPreset("small", hidden=384, layers=6, heads=6, kv_heads=2, intermediate=1024, vision_hidden=192,
                        vision_layers=3, vision_heads=4, vision_intermediate=384, image_size=48, patch_size=8),
}


def get_preset(preset: str | TinyPreset) -> TinyPreset:
    """A preset by name (``micro``, ``tiny``, ``small``) or passed through."""
    if isinstance(preset, TinyPreset):
        preset.validate()
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(PRESETS)} or a TinyPreset")
    return PRESETS[preset]


def build_processor(tokenizer: PreTrainedTokenizerFast, preset: str | TinyPreset) -> LlavaProcessor:
    """A ``LlavaProcessor`` at the preset's image size: CLIP normalisation, resize + center crop to ``S x S``, and
    ``<image>`` expanded to ``preset.image_tokens`` tokens."""
    p = get_preset(preset)
    if tokenizer.convert_tokens_to_ids(IMAGE) in (None, tokenizer.unk_token_id):
        raise ValueError(f"tokenizer has no {IMAGE!r} token: train it with lumoe_engine.model.tokenizer")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": p.image_size},
                                            crop_size={"height": p.image_size, "width": p.image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=p.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token=IMAGE)


def build_config(tokenizer: PreTrainedTokenizerFast, preset: str | TinyPreset) -> LlavaConfig:
    """The ``LlavaConfig`` of a tiny LLaVA whose vocabulary is ``tokenizer``'s."""
    p = get_preset(preset)
    vision = CLIPVisionConfig(hidden_size=p.vision_hidden, intermediate_size=p.vision_intermediate,
                              num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
                              image_size=p.image_size, patch_size=p.patch_size, projection_dim=p.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=p.hidden, intermediate_size=p.intermediate,
                       num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                       max_position_embeddings=p.max_positions, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
                       image_seq_length=p.image_tokens, vision_feature_select_strategy="default",
                       vision_feature_layer=-1, projector_hidden_act="gelu")


def build_tiny_llava(tokenizer: PreTrainedTokenizerFast, preset: str | TinyPreset = "tiny",
                     seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised tiny LLaVA (fp32, eval mode, sdpa attention) and its processor.

    The generation config ends at ``</s>``, pads with ``<pad>``, decodes greedily.
    """
    p = get_preset(preset)
    config = build_config(tokenizer, p)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)  # attention: sdpa (transformers' default on CPU)
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = (tokenizer.pad_token_id, tokenizer.eos_token_id,
                                                         tokenizer.bos_token_id)
    gc.do_sample = False
    model.eval()
    return model, build_processor(tokenizer, p)
