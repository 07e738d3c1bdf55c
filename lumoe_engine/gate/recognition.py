"""The answer channel: what the frozen base itself would answer to a query with a picture.

The base already knows the entities (that is why it can leak); whether it recognises a forgotten entity in a new
picture shows in its own answer: it names the entity, or states one of the facts the entity's request forgets. So
for each query with a picture, ``Recognizer.answer`` lets the frozen base (every expert off) answer the query
itself, a short greedy decode, and the gate matches that answer against its experts' names (``names.NameIndex``,
typo-tolerant) and facts (exactly; ``gate.policy``). This generalises exactly as far as the base's knowledge does:
to new scenes and new wordings of a forgotten entity, whatever the question asks; a query the base cannot answer
reveals nothing and is left to the base. It needs no question of its own (the gate never asks anything the user did
not); ``probe`` replaces every prompt by one fixed question (an identity question such as ``IDENTITY_PROBE``, for a
model that answers one as a real LLaVA answers "what is this?").

Measured before this design, on the development seed 0 (1 thread), and dropped: teaching the tiny base
``IDENTITY_PROBE`` on its taught pictures and on 96-192 entity-free pictures and asking it that question: it named
the entity of 0.71-0.75 of the held-out scenes (its name questions: 0.85-0.96) and said "nothing" for 0.44-0.51 of
the general pictures (seed 1: 0.59 and 0.36): a question of its own generalises only as far as it was taught.

Cost: one short greedy decode of the base per distinct (picture, prompt), batched, before the routed generation;
the base is frozen, so the answer is a function of the picture and the prompt and is kept (``cache_size`` entries,
keyed by a hash of the pixels and the prompt): a query asked again costs a hash.

Letters: B queries.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from PIL import Image

# an identity question for ``probe`` (not used by default: the base answers each query itself)
IDENTITY_PROBE = "What is the name of what this picture shows?"


class Recognizer:
    """Lets the frozen base answer queries with a picture (module docstring).

    model / processor: the (wrapped) base and its processor; ctx: its LoRA context, cleared before the base answers so
    that no expert takes part (None: an unwrapped model); probe: None (each query's own prompt) or one question
    asked instead; max_new_tokens: the answer's length (the answers that reveal a name or a fact are short);
    batch_size: queries per forward; cache_size: answers kept (0: none).
    """

    def __init__(self, model, processor, ctx=None, probe: Optional[str] = None, max_new_tokens: int = 16,
                 batch_size: int = 64, cache_size: int = 100_000):
        if probe is not None and (not isinstance(probe, str) or not probe.strip()):
            raise ValueError(f"probe={probe!r}: expected None (each query's own prompt) or a question as text")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 1")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size={cache_size!r}: expected an int >= 0")
        self.model, self.processor, self.ctx = model, processor, ctx
        self.probe, self.max_new_tokens, self.batch_size = probe, max_new_tokens, batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, str] = OrderedDict()
        self.calls = 0  # queries the base answered (cost bookkeeping; cache hits not counted)
        self.hits = 0

    @staticmethod
    def picture_key(image: Image.Image) -> str:
        """A hash of the picture's pixels, size and mode."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def answer(self, images: Sequence[Optional[Image.Image]], prompts: Sequence[str]) -> list[Optional[str]]:
        """The base's answer to each query with a picture (None where the query has none). [B] -> [B]."""
        from lumoe_engine.data.records import QARecord
        from lumoe_engine.model import collate

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts; pass one (or None) per prompt")
        out: list[Optional[str]] = [None] * len(images)
        todo: dict[str, list[int]] = {}
        asked: dict[str, tuple] = {}
        for i, (im, q) in enumerate(zip(images, prompts)):
            if im is None:
                continue
            q = self.probe or q
            k = f"{self.picture_key(im)}:{hashlib.blake2b(q.encode(), digest_size=8).hexdigest()}"
            if k in self._cache:
                out[i] = self._cache[k]
                self._cache.move_to_end(k)
                self.hits += 1
            else:
                todo.setdefault(k, []).append(i)
                asked.setdefault(k, (im, q))
        if not todo:
            return out
        if self.ctx is not None:
            self.ctx.clear()
        keys = list(todo)
        recs = [QARecord(uid=f"answer{i}", entity="", cls="", kind=0, phrasing=0, question=asked[k][1], answer="")
                for i, k in enumerate(keys)]  # (rows to batch: every one with its picture)
        texts = collate.generate_answers(self.model, self.processor, recs, self.max_new_tokens,
                                         batch_size=self.batch_size, images=[asked[k][0] for k in keys])
        for k, t in zip(keys, texts):
            for i in todo[k]:
                out[i] = t
            if self.cache_size:
                self._cache[k] = t
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        self.calls += len(keys)
        return out

    def answer_records(self, records: Sequence, image_fn=None) -> dict[str, str]:
        """{uid: the base's answer} for the records with a picture of ``records`` (QARecords; text-only ones
        skipped); image_fn: record -> PIL image (default the benchmark loader)."""
        if image_fn is None:
            from lumoe_engine.data.mlubench import load_image as image_fn
        recs = [r for r in records if r.form == "image_text" and r.image is not None]
        said = self.answer([image_fn(r) for r in recs], [r.question for r in recs])
        return {r.uid: t for r, t in zip(recs, said)}


def request_facts(records: Sequence) -> list[str]:
    """The facts a request forgets, as text: the answer keys of its forget records (their answer where a record
    has no keys), each once, in order."""
    out: list[str] = []
    for r in records:
        for k in (tuple(getattr(r, "keys", ()) or ()) or (r.answer,)):
            if isinstance(k, str) and k.strip() and any(ch.isalnum() for ch in k) and k.strip() not in out:
                out.append(k.strip())
    return out


__all__ = ["Recognizer", "IDENTITY_PROBE", "request_facts"]
