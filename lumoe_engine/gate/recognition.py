"""The recognition channel: the base model's own answer to an identity question about a query's picture.

The base already knows the entities (that is why it can leak), so who it says a picture shows generalises as far as
its knowledge does: to new scenes of a forgotten entity, whatever the question asks. For each query with an image,
``Recognizer.identify`` asks the frozen base (every expert off) ``IDENTITY_PROBE`` about that image and decodes a
short answer; the gate then matches that answer against its experts' names as text (``names.NameIndex``), exactly
as it matches a prompt. A query with an image goes to an expert when the base names that expert's entity for its
picture, or when its prompt names it.

The probe is one fixed wording; the embedded default teaches it for every entity's taught pictures (and, on
entity-free pictures, the answer ``NO_ENTITY_ANSWER``: ``model.teach_identity``), so the tiny base answers it as a
real LLaVA answers "what is the name of what this picture shows?". Cost: one short greedy decode of the base per
distinct picture (prefill of image + probe, at most ``max_new_tokens`` steps), batched; the base is frozen, so the
answer is a function of the picture and is kept (``cache_size`` pictures, by a hash of their pixels): a picture
asked about again costs a hash. The routed generation follows.

Letters: B queries.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from PIL import Image

# the identity question the gate asks the base about a picture, and what the taught base answers for a picture that
# shows no entity
IDENTITY_PROBE = "What is the name of what this picture shows?"
NO_ENTITY_ANSWER = "Nothing I know by name."


class Recognizer:
    """Asks the frozen base who a picture shows (module docstring).

    model / processor: the (wrapped) base and its processor; ctx: its LoRA context, cleared before the probe so that
    no expert takes part (None: an unwrapped model); probe: the identity question; max_new_tokens: the answer's
    length (names are short); batch_size: pictures per forward; cache_size: answers kept (0: none).
    """

    def __init__(self, model, processor, ctx=None, probe: str = IDENTITY_PROBE, max_new_tokens: int = 12,
                 batch_size: int = 64, cache_size: int = 100_000):
        if not isinstance(probe, str) or not probe.strip():
            raise ValueError(f"probe={probe!r}: expected the identity question as text")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 1")
        self.model, self.processor, self.ctx = model, processor, ctx
        self.probe, self.max_new_tokens, self.batch_size = probe, max_new_tokens, batch_size
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size={cache_size!r}: expected an int >= 0")
        self.cache_size = cache_size
        self._cache: OrderedDict[str, str] = OrderedDict()
        self.calls = 0  # pictures the base was asked about (cost bookkeeping; cache hits not counted)
        self.hits = 0

    @staticmethod
    def picture_key(image: Image.Image) -> str:
        """A hash of the picture's pixels, size and mode (the cache key)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def identify(self, images: Sequence[Optional[Image.Image]]) -> list[Optional[str]]:
        """The base's answer to the probe for each image (None where the query has no image). [B] -> [B]."""
        from lumoe_engine.engine import query_records
        from lumoe_engine.model.collate import generate_answers

        out: list[Optional[str]] = [None] * len(images)
        todo: dict[str, list[int]] = {}
        pics: dict[str, Image.Image] = {}
        for i, im in enumerate(images):
            if im is None:
                continue
            k = self.picture_key(im)
            if k in self._cache:
                out[i] = self._cache[k]
                self._cache.move_to_end(k)
                self.hits += 1
            else:
                todo.setdefault(k, []).append(i)
                pics.setdefault(k, im)
        if not todo:
            return out
        if self.ctx is not None:
            self.ctx.clear()
        keys = list(todo)
        recs = query_records([self.probe] * len(keys), [pics[k] for k in keys])
        texts = generate_answers(self.model, self.processor, recs, self.max_new_tokens, batch_size=self.batch_size,
                                 images=[pics[k] for k in keys])
        for k, t in zip(keys, texts):
            for i in todo[k]:
                out[i] = t
            if self.cache_size:
                self._cache[k] = t
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        self.calls += len(keys)
        return out

    def identify_records(self, records: Sequence, image_fn=None) -> dict[str, str]:
        """{picture path: the base's answer} for the distinct pictures of ``records`` (QARecords; text-only ones
        skipped); image_fn: record -> PIL image (default the benchmark loader)."""
        if image_fn is None:
            from lumoe_engine.data.mlubench import load_image as image_fn
        first = {}
        for r in records:
            if r.form == "image_text" and r.image is not None:
                first.setdefault(picture_of(r), r)
        keys = list(first)
        said = self.identify([image_fn(first[k]) for k in keys])
        return dict(zip(keys, said))


def picture_of(record) -> str:
    """The key of a record's picture (its path; a missing file's surrogate is the entity's)."""
    return f"{record.image}|{record.entity}" if getattr(record, "image_missing", False) else str(record.image)


__all__ = ["Recognizer", "IDENTITY_PROBE", "NO_ENTITY_ANSWER", "picture_of"]
