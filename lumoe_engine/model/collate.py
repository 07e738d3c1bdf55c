"""QA records -> model batches (images really passed through the processor), and batched greedy generation.

Letters: B rows (records), L padded sequence length, n image rows in the batch, S image side, C channels (3).

A batch mixes both forms. LLaVA scatters the projected patch states of ``pixel_values`` into the ``<image>`` positions
of the whole batch in row-major order, so ``pixel_values`` holds one image per ``image_text`` row, in row order, and
``text_only`` rows carry no image and no ``<image>`` token: no dummy image, nothing for text rows to attend to. A batch
with no image row has no ``pixel_values`` key.

Sequences are padded on the left (what generation needs; training uses the same layout) and carry explicit
``position_ids`` (= cumulative attention mask - 1, as ``generate`` builds them), so a row gives the same logits alone or
in any batch. ``labels`` are -100 on padding and prompt tokens; the answer tokens and the closing eos are supervised.

The prompt comes from the processor's chat template when it has one (the tiny processor's renders llava-1.5's
``USER: <image>\\n{question} ASSISTANT:``), else from ``tokenizer.format_prompt``. The answer's token ids are the
tokens that follow the prompt when prompt + " " + answer is tokenized as one text (exact for any tokenizer).
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

import torch
from PIL import Image

from lumoe_engine.data.records import FORMS, QARecord
from lumoe_engine.model.tokenizer import format_answer, format_prompt

ImageFn = Callable[[QARecord], Image.Image]
IGNORE = -100

# per-processor caches (answer token ids, image token count), dropped with the processor
_CACHE: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _cache(processor) -> dict:
    if processor not in _CACHE:
        _CACHE[processor] = {"answer_ids": {}}
    return _CACHE[processor]


def _default_image_fn() -> ImageFn:
    from lumoe_engine.data.mlubench import load_image  # the benchmark's loader (surrogate image when missing)

    return load_image


def prompt_text(processor, question: str, with_image: bool) -> str:
    """The generation prompt (text, one ``<image>`` placeholder when ``with_image``) for ``question``."""
    template = getattr(processor, "chat_template", None)
    if not template:
        return format_prompt(question, with_image, getattr(processor, "image_token", "<image>"))
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question.strip()}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def answer_ids(processor, prompt: str, answer: str) -> list[int]:
    """Token ids of ``answer`` as they follow ``prompt`` (eos appended): the supervised part of a sequence."""
    tok = _tokenizer(processor)
    cache = _cache(processor)["answer_ids"]
    key = (prompt, answer)
    if key not in cache:
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        full = tok(prompt + format_answer(answer), add_special_tokens=True)["input_ids"]
        if full[:len(p)] == p and len(full) > len(p):
            ids = full[len(p):]
        else:  # the boundary merged (rare): tokenize the answer alone
            ids = tok(format_answer(answer), add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is None:
            raise ValueError("processor.tokenizer has no eos_token_id: answers must end with an end-of-sequence token")
        cache[key] = list(ids) + [tok.eos_token_id]
    return cache[key]


def image_token_count(processor) -> Optional[int]:
    """Tokens one ``<image>`` expands to when that count is fixed (LLaVA-1.5 processors), else None (LLaVA-NeXT: it
    depends on the image's size). Measured once through the processor on a blank image and cached on it."""
    cache = _cache(processor)
    if "image_tokens" not in cache:
        n = None
        if type(processor).__name__ == "LlavaProcessor":
            tok = _tokenizer(processor)
            side = image_side(processor)
            out = processor(text=[prompt_text(processor, "x", True)], images=[Image.new("RGB", (side, side))],
                            return_tensors="pt")
            n = int((out["input_ids"] == tok.convert_tokens_to_ids(processor.image_token)).sum())
        cache["image_tokens"] = n
    return cache["image_tokens"]


def image_side(processor) -> int:
    """The side ``S`` of the processor's output images (crop size, else shortest edge)."""
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) or {}
    if isinstance(crop, dict) and crop.get("height"):
        return int(crop["height"])
    size = getattr(ip, "size", None) or {}
    return int(size.get("shortest_edge") or size.get("height") or 336)


def pixel_values_for(processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """The image processor's tensor for ``images``: ``[n, C, S, S]`` fp32 (LLaVA-1.5 processors)."""
    out = processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt")
    return out["pixel_values"]


def _check(records: Sequence[QARecord]) -> None:
    if not records:
        raise ValueError("records: empty batch; pass at least one QARecord")
    for r in records:
        if not isinstance(r, QARecord):
            raise ValueError(f"records: expected QARecord items, got {type(r).__name__}")
        if r.form not in FORMS:
            raise ValueError(f"record {r.uid!r}: form={r.form!r}, expected one of {FORMS}")


def collate(records: Sequence[QARecord], processor, *, with_answers: bool = True,
            images: Optional[Sequence[Optional[Image.Image]]] = None,
            pixel_values: Optional[torch.Tensor] = None,
            questions: Optional[Sequence[str]] = None,
            image_fn: Optional[ImageFn] = None) -> dict[str, torch.Tensor]:
    """Batch ``records`` for the model.

    with_answers: append answer + eos and return ``labels`` (training, loss); False gives prompts only (generation).
    images: one PIL image (or None) per record, replacing the record's own image for ``image_text`` rows (e.g. noise).
    pixel_values: ``[n, C, S, S]``, already processed, one per ``image_text`` row in row order (fast path for
        training with cached/augmented images; LLaVA-1.5 processors only).
    questions: one question text per record, replacing ``record.question`` (word-level augmentation).
    image_fn: record -> PIL image for ``image_text`` rows (default: the benchmark loader, surrogate when missing).
    Returns input_ids/attention_mask/position_ids ``[B, L]`` int64, labels ``[B, L]`` (with answers),
    pixel_values ``[n, C, S, S]`` (n > 0), image_sizes (processors that need them).
    """
    _check(records)
    tok = _tokenizer(processor)
    if tok.pad_token_id is None:
        raise ValueError("processor.tokenizer has no pad_token_id: set one (e.g. tokenizer.pad_token = eos) first")
    if questions is not None and len(questions) != len(records):
        raise ValueError(f"questions: {len(questions)} texts for {len(records)} records; pass one per record")
    if images is not None and len(images) != len(records):
        raise ValueError(f"images: {len(images)} images for {len(records)} records; pass one (or None) per record")
    image_rows = [i for i, r in enumerate(records) if r.form == "image_text"]
    prompts = [prompt_text(processor, questions[i] if questions is not None else r.question, r.form == "image_text")
               for i, r in enumerate(records)]

    extra: dict[str, torch.Tensor] = {}
    if pixel_values is not None:
        if pixel_values.shape[0] != len(image_rows) or (image_rows and pixel_values.dim() != 4):
            raise ValueError(f"pixel_values: shape {tuple(pixel_values.shape)}, expected [{len(image_rows)}, C, S, S] "
                             "(one processed image per image_text record, in row order)")
        n = image_token_count(processor)
        if n is None:
            raise ValueError("pixel_values= needs a processor with a fixed image token count (LLaVA-1.5); pass "
                             "images= instead")
        image_tok = processor.image_token
        texts = [p.replace(image_tok, image_tok * n) for p in prompts]
        prompt_ids = tok(texts, add_special_tokens=True)["input_ids"]
        if image_rows:
            extra["pixel_values"] = pixel_values
    elif image_rows:
        fn = image_fn or _default_image_fn()
        pil = []
        for i in image_rows:
            im = images[i] if images is not None and images[i] is not None else fn(records[i])
            pil.append(im.convert("RGB"))
        # the processor expands each <image> (count checked against the images) and processes the pixels
        out = processor(text=prompts, images=pil, return_tensors="pt", padding=True)
        am = out["attention_mask"].bool()
        prompt_ids = [row[m].tolist() for row, m in zip(out["input_ids"], am)]
        extra["pixel_values"] = out["pixel_values"]
        if "image_sizes" in out:
            extra["image_sizes"] = out["image_sizes"]
    else:
        prompt_ids = tok(prompts, add_special_tokens=True)["input_ids"]

    seqs, labs = [], []
    for r, p, ids in zip(records, prompts, prompt_ids):
        ids = list(ids)
        if with_answers:
            a = answer_ids(processor, p, r.answer)
            seqs.append(ids + a)
            labs.append([IGNORE] * len(ids) + a)
        else:
            seqs.append(ids)
    L = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, L), tok.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    for b, s in enumerate(seqs):  # left padding
        input_ids[b, L - len(s):] = torch.tensor(s)
        attention_mask[b, L - len(s):] = 1
        if with_answers:
            labels[b, L - len(s):] = torch.tensor(labs[b])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0)}
    if with_answers:
        batch["labels"] = labels
    batch.update(extra)
    return batch


@torch.no_grad()
def generate_answers(model, processor, records: Sequence[QARecord], max_new_tokens: int = 32, batch_size: int = 64,
                     images: Optional[Sequence[Optional[Image.Image]]] = None,
                     pixel_values: Optional[torch.Tensor] = None,
                     questions: Optional[Sequence[str]] = None,
                     image_fn: Optional[ImageFn] = None) -> list[str]:
    """Greedy answers to ``records`` (batched, left padded), decoded without special tokens, stripped.

    images / questions: per-record overrides as in ``collate``; pixel_values: ``[n, C, S, S]`` for all image_text
    records of ``records`` in order (split across batches here).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
    if not records:
        return []
    tok = _tokenizer(processor)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: list[str] = []
    img_pos = 0
    try:
        for s in range(0, len(records), batch_size):
            chunk = list(records[s:s + batch_size])
            kw = {}
            if images is not None:
                kw["images"] = images[s:s + batch_size]
            if questions is not None:
                kw["questions"] = questions[s:s + batch_size]
            if pixel_values is not None:
                n = sum(r.form == "image_text" for r in chunk)
                kw["pixel_values"] = pixel_values[img_pos:img_pos + n]
                img_pos += n
            batch = collate(chunk, processor, with_answers=False, image_fn=image_fn, **kw)
            batch.pop("position_ids")  # generate builds them from the attention mask (the same values)
            batch = {k: v.to(device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            answers.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers
