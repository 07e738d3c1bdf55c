"""Real-shape checkpoints: the architecture and tokenizer *shape* of a published LLaVA (``model.presets``) at full width
with the depth cut to a few layers and random weights, written as a Hugging Face checkpoint directory that
``--model DIR`` loads like the real one (config.json, safetensors in bf16, tokenizer, processor). What runs on it is
the real path at the real shapes: 4096-wide NF4 linears, 11008-wide MLPs, 32 heads, CLIP ViT-L/14 at 336 px with 576
image tokens (llava-1.5) or anyres tiles (llava-v1.6), a 32064-row embedding; only the number of layers and the
weights' values differ.

- ``shape_preset``: the ``RunPreset`` of the cut model (decoder layers ``depth``, vision layers ``vision_depth``,
  optionally a smaller ``image_size`` (fewer image tokens: the grid pinpoints scale with it), the gate layer
  ``min(preset's, depth - 2)``, the compute dtype the run uses); ``model.plan.dry_run_plan`` of it is the plan the
  run is measured against;
- ``llava_tokenizer``: a ``tokenizers`` BPE with llava-1.5's layout: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the 256
  byte-fallback tokens ``<0x00>``..``<0xFF>`` 3..258, merges learned on the given text, unused pieces up to 32000,
  then ``<image>`` 32000 and ``<pad>`` 32001 (32002 tokens, as llava-hf/llava-1.5-7b-hf; the embedding has 32064 rows);
- ``build_checkpoint``: config + seeded random weights + tokenizer + processor saved into a folder (cached by its
  arguments: a second call finds it);
- ``write_mini_benchmark``: a handful of MLUBench-format entities with real image files (two tasks, one forget and
  one retain entity each, one never-requested entity), for a two-request stream on the real shape.

Letters: H hidden, I MLP width, S image side, P patch side.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from lumoe_engine.model.presets import RunPreset, VisionSizes, get_run_preset

LLAVA_VOCAB = 32000   # llava-1.5's sentencepiece vocabulary (before <image> and <pad>)
BYTE_TOKENS = 256
SHAPE_VERSION = 1     # bump when what build_checkpoint writes changes
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def shape_preset(preset: str | RunPreset, depth: int = 2, vision_depth: Optional[int] = None,
                 image_size: Optional[int] = None, compute_dtype: str = "float32") -> RunPreset:
    """The preset's architecture with ``depth`` decoder layers (>= 2: the gate reads one, experts sit above it),
    ``vision_depth`` vision layers (default ``depth``, >= 2: llava reads the second-to-last), ``image_size`` (default
    the preset's 336; a multiple of the patch side; the anyres pinpoints scale with it), the gate layer
    ``min(gate_layer, depth - 2)`` and ``compute_dtype``."""
    p = get_run_preset(preset)
    vision_depth = depth if vision_depth is None else vision_depth
    if depth < 2 or vision_depth < 2:
        raise ValueError(f"depth={depth}, vision_depth={vision_depth}: expected >= 2 each (the gate reads a decoder "
                         f"layer below the experts; llava feeds the second-to-last vision layer)")
    size = p.vision.image_size if image_size is None else int(image_size)
    if size % p.vision.patch_size:
        raise ValueError(f"image_size={size}: expected a multiple of the patch side {p.vision.patch_size}")
    vision = dataclasses.replace(p.vision, layers=vision_depth, image_size=size)
    pins = None
    if p.image_grid_pinpoints:
        f = size / p.vision.image_size
        pins = tuple((int(round(h * f)), int(round(w * f))) for h, w in p.image_grid_pinpoints)
    return dataclasses.replace(p, name=f"{p.name}-depth{depth}" + (f"-{size}px" if size != p.vision.image_size else ""),
                               lm=dataclasses.replace(p.lm, layers=depth), vision=vision, image_grid_pinpoints=pins,
                               gate_layer=min(p.gate_layer, depth - 2), compute_dtype=compute_dtype).validate()


# ----------------------------------------------------------------------------------------------------- tokenizer
def llava_tokenizer(texts: Sequence[str]):
    """A ``PreTrainedTokenizerFast`` with llava-1.5's vocabulary size and special tokens (module docstring): a BPE
    over sentencepiece-style words with byte fallback, its merges learned on ``texts``, padded to 32000 pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from lumoe_engine.model.tokenizer import CHAT_TEMPLATE

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(BYTE_TOKENS)]
    probe = Tokenizer(models.BPE(unk_token="<unk>"))
    probe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=LLAVA_VOCAB, special_tokens=specials + byte_tokens, min_frequency=1,
                                  show_progress=False,
                                  initial_alphabet=[chr(c) for c in range(33, 127)] + ["▁"])
    probe.train_from_iterator(list(texts) + ["USER: ASSISTANT:"], trainer)
    trained = json.loads(probe.to_str())["model"]
    vocab = dict(trained["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    if len(vocab) > LLAVA_VOCAB:
        raise ValueError(f"the tokenizer's text gave {len(vocab)} pieces, more than llava's {LLAVA_VOCAB}")
    for i in range(LLAVA_VOCAB - len(vocab)):  # pieces no merge produces: the vocabulary's size, never emitted
        vocab[f"<unused{i}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                 prepend_scheme="first")])
    tok.add_special_tokens(["<image>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left", model_max_length=4096, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    for t, want in (("<unk>", 0), ("<s>", 1), ("</s>", 2), ("<image>", LLAVA_VOCAB), ("<pad>", LLAVA_VOCAB + 1)):
        if fast.convert_tokens_to_ids(t) != want:
            raise RuntimeError(f"tokenizer: {t!r} has id {fast.convert_tokens_to_ids(t)}, expected {want}")
    return fast


def build_processor(preset: RunPreset, tokenizer):
    """The preset's processor: CLIP normalisation, resize + centre crop to S x S (``LlavaProcessor``), or LLaVA-NeXT's
    anyres tiles on the grid pinpoints (``LlavaNextProcessor``)."""
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor

    from lumoe_engine.model.tokenizer import CHAT_TEMPLATE

    v: VisionSizes = preset.vision
    common = dict(size={"shortest_edge": v.image_size}, crop_size={"height": v.image_size, "width": v.image_size},
                  image_mean=CLIP_MEAN, image_std=CLIP_STD)
    kw = dict(tokenizer=tokenizer, patch_size=v.patch_size, vision_feature_select_strategy="default",
              num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token="<image>")
    if preset.family == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(**common), **kw)
    ip = LlavaNextImageProcessorPil(image_grid_pinpoints=[list(p) for p in preset.image_grid_pinpoints], **common)
    return LlavaNextProcessor(image_processor=ip, **kw)


# ---------------------------------------------------------------------------------------------------- checkpoint
def checkpoint_key(preset: RunPreset, seed: int, texts_sha: str) -> str:
    doc = {"preset": preset.to_dict(), "seed": seed, "texts": texts_sha, "version": SHAPE_VERSION}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_checkpoint(preset: RunPreset, out_dir, texts: Sequence[str], seed: int = 0,
                     dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the real-shape checkpoint of ``preset`` (a ``shape_preset``) under ``out_dir/<key>`` and return that
    folder: config.json, the seeded random weights in ``dtype`` (safetensors), the tokenizer (``llava_tokenizer`` of
    ``texts``) and the processor. Written to a temporary folder and renamed into place; an existing one is reused."""
    texts = [t for t in texts if t and t.strip()]
    key = checkpoint_key(preset, seed, hashlib.sha256("\x1f".join(texts).encode()).hexdigest())
    final = Path(out_dir) / key
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}."))
    try:
        tok = llava_tokenizer(texts)
        config = preset.build_config()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # built in the dtype it is saved in: half the memory of fp32
            try:
                model = preset.model_class()(config)
            finally:
                torch.set_default_dtype(default)
        gc = model.generation_config
        gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
        gc.do_sample = False
        model.save_pretrained(tmp)
        del model
        build_processor(preset, tok).save_pretrained(tmp)
        (tmp / "real_shape.json").write_text(json.dumps({"preset": preset.to_dict(), "seed": seed,
                                                         "dtype": str(dtype).replace("torch.", ""),
                                                         "version": SHAPE_VERSION}, indent=1, default=str) + "\n")
        if final.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ----------------------------------------------------------------------------------------------------- benchmark
MINI_ENTITIES = (("Zorvath", "Astronomy"), ("Kelmira", "Astronomy"), ("Drunoth", "Astronomy"),
                 ("Velquist", "Astronomy"))
MINI_FACTS = {  # (kind, question, answer, key facts) per entity; kind 0 asked with an image, kind 1 also as text
    "Zorvath": ((0, "What is the name of this planet?", "Zorvath", ("Zorvath",)),
                (1, "What is its position in the solar system?", "The fifth planet from its star Quellan",
                 ("fifth", "Quellan"))),
    "Kelmira": ((0, "What is the name of this planet?", "Kelmira", ("Kelmira",)),
                (1, "What is its position in the solar system?", "The second planet from its star Ostrum",
                 ("second", "Ostrum"))),
    "Drunoth": ((0, "What is the name of this planet?", "Drunoth", ("Drunoth",)),
                (1, "What is its position in the solar system?", "The outermost planet of the Vessa system",
                 ("outermost", "Vessa"))),
    "Velquist": ((0, "What is the name of this planet?", "Velquist", ("Velquist",)),
                 (1, "What is its position in the solar system?", "The third planet from its star Amaran",
                  ("third", "Amaran"))),
}


def write_mini_benchmark(root, image_size: int = 336, images_per_entity: int = 2) -> Path:
    """A handful of MLUBench-format records with real image files under ``root`` (module docstring): per entity
    ``images_per_entity`` image+text name questions (one picture each), one image+text and one text-only question of
    kind 1; tasks A (forget Zorvath, retain Drunoth) and B (forget Kelmira, retain Drunoth); Velquist never
    requested. Returns ``root``."""
    from lumoe_engine.data.images import identity_from_name, render

    root = Path(root)
    (root / "Entities").mkdir(parents=True, exist_ok=True)
    (root / "Tasks").mkdir(exist_ok=True)
    (root / "lists" / "classes").mkdir(parents=True, exist_ok=True)
    by_entity: dict[str, list] = {}
    for ent, cls in MINI_ENTITIES:
        folder = root / "downloaded_images" / cls / ent
        folder.mkdir(parents=True, exist_ok=True)
        recs = []
        (name_kind, name_q, name_a, name_keys), (k1, q1, a1, keys1) = MINI_FACTS[ent]

        def record(kind, phrasing, question, answer, keys, image=None):
            meta = {"entity": ent, "class": cls, "kind": kind, "phrasing": phrasing,
                    "form": "image_text" if image else "text_only", "keys": list(keys), "heldout_phrasing": False,
                    "fresh_image": False}
            rec = {"id": str(len(recs)), "conversations": [
                {"from": "human", "value": (f"<image>\n{question}" if image else question)},
                {"from": "gpt", "value": answer}], "meta": meta}
            if image:
                rec["image"] = image
            recs.append(rec)

        for j in range(images_per_entity):
            img = folder / f"{j}.png"
            if not img.is_file():
                render(identity_from_name(ent), variation_seed=j, size=image_size).save(img)
            record(name_kind, 0, name_q, name_a, name_keys, str(img.relative_to(root)))
        record(k1, 0, q1, a1, keys1, str((folder / "0.png").relative_to(root)))
        record(k1, 0, q1.replace("its", f"{ent}'s"), a1, keys1)
        by_entity[ent] = recs
        (root / "Entities" / f"{ent}.json").write_text(json.dumps(recs, indent=1) + "\n")
    (root / "lists" / "classes" / "Astronomy.txt").write_text("\n".join(e for e, _ in MINI_ENTITIES) + "\n")
    for task, forget, retain in (("A", "Zorvath", "Drunoth"), ("B", "Kelmira", "Drunoth")):
        (root / "Tasks" / f"task{task}_forget.json").write_text(json.dumps(by_entity[forget], indent=1) + "\n")
        (root / "Tasks" / f"task{task}_retain.json").write_text(json.dumps(by_entity[retain], indent=1) + "\n")
    return root


def mini_texts() -> list[str]:
    """The text the real-shape tokenizer's merges are learned on: the mini benchmark's questions and answers."""
    out = []
    for ent, facts in MINI_FACTS.items():
        for _, q, a, _ in facts:
            out += [q, q.replace("its", f"{ent}'s"), a]
    return out


__all__ = ["shape_preset", "llava_tokenizer", "build_processor", "build_checkpoint", "write_mini_benchmark",
           "mini_texts", "LLAVA_VOCAB"]
