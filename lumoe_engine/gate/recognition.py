"""The recognition channel: the base model's own answer to an identity question about a query's picture.

The base already knows the entities (that is why it can leak), so who it says a picture shows generalises as far as
its knowledge does: to new scenes of a forgotten entity, whatever the question asks. For each query with an image,
``Recognizer.identify`` asks the frozen base (every expert off) ``IDENTITY_PROBE`` about that image and decodes a
short answer; the gate then matches that answer against its experts' names as text (``names.NameIndex``), exactly
as it matches a prompt. A query with an image goes to an expert when the base names that expert's entity for its
picture, or when its prompt names it.

The probe is one fixed wording; the embedded default teaches it for every entity's taught pictures (and, on
entity-free scenes, the answer ``NO_ENTITY_ANSWER``), so the tiny base answers it as a real LLaVA answers "what is
the name of what this picture shows?". Cost: one short greedy decode of the base per image query (prefill of image +
probe, at most ``max_new_tokens`` steps), batched; the routed generation follows.

Letters: B queries.
"""
from __future__ import annotations

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
    length (names are short); batch_size: pictures per forward.
    """

    def __init__(self, model, processor, ctx=None, probe: str = IDENTITY_PROBE, max_new_tokens: int = 12,
                 batch_size: int = 64):
        if not isinstance(probe, str) or not probe.strip():
            raise ValueError(f"probe={probe!r}: expected the identity question as text")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 1")
        self.model, self.processor, self.ctx = model, processor, ctx
        self.probe, self.max_new_tokens, self.batch_size = probe, max_new_tokens, batch_size
        self.calls = 0  # pictures asked about (cost bookkeeping)

    @torch.no_grad()
    def identify(self, images: Sequence[Optional[Image.Image]]) -> list[Optional[str]]:
        """The base's answer to the probe for each image (None where the query has no image). [B] -> [B]."""
        from lumoe_engine.engine import query_records
        from lumoe_engine.model.collate import generate_answers

        idx = [i for i, im in enumerate(images) if im is not None]
        out: list[Optional[str]] = [None] * len(images)
        if not idx:
            return out
        if self.ctx is not None:
            self.ctx.clear()
        recs = query_records([self.probe] * len(idx), [images[i] for i in idx])
        texts = generate_answers(self.model, self.processor, recs, self.max_new_tokens, batch_size=self.batch_size,
                                 images=[images[i] for i in idx])
        for i, t in zip(idx, texts):
            out[i] = t
        self.calls += len(idx)
        return out


__all__ = ["Recognizer", "IDENTITY_PROBE", "NO_ENTITY_ANSWER"]
