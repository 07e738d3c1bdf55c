"""The collapse guard: a freshly trained expert must still answer like a working model on its own request's queries.

``collapse_check`` runs the new expert (not yet saved) on a few of its request's queries (``validation_queries``)
and raises ``ExpertCollapseError`` when most answers are gibberish (``degenerate_answer``) while the base model's
are not; the request then fails alone and nothing of it reaches the bank or the gate. The pipeline
(``lumoe_engine.pipeline``) calls it for every request, from a stream or a store.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from lumoe_engine.data.records import QARecord
from lumoe_engine.data.streams import Request
from lumoe_engine.errors import ExpertCollapseError

COLLAPSE_QUERIES = 8        # validation queries per expert: half forget (both forms), half retain when it has any
COLLAPSE_MAX_SHARE = 0.5    # the expert collapsed when more than this share of its answers is degenerate
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*", re.UNICODE)
_GLUED = re.compile(r"[^\W\d_]{3,}\d+|\d+[^\W\d_]{3,}\d*", re.UNICODE)  # "seasons5", "5Drosork": no word


def degenerate_answer(text: str, vocab: Optional[set] = None) -> Optional[str]:
    """Why ``text`` is not an answer a working model gives (None when it looks like one).

    Degenerate: a replacement character or an unknown-token marker; no word at all; one word repeated three times
    in a row (``"the the the"``); a word of 4+ letters twice in a row (``"Fekroun Fekroun"``, digits ignored); a
    word of 3+ letters glued to digits (``"seasons5"``, ``"Drosork555"``: the word tokenizer's babble); one word
    making up more than half of an answer of at least four words; under half
    of its characters letters/digits/spaces/common punctuation; and, given the tokenizer's ``vocab`` (lower-cased
    words), under half of its alphabetic words known to it. An IDK refusal ("I don't know anything about that
    person.") passes every rule; the babble of a collapsed expert fails at least one (measured on the micro LLaVA
    taught 150 steps: an expert with its B matrices scaled up answers "Atlas Atlas Atlas ...", "printers5 printers5
    Fekroun Kobratror printers", "Quashind seasons Drosork53 Fekroun Fekroun": 8 of 8 flagged; its base answers
    "Trailing runner", "Tarouth Nequiox": 0 of 8).

    An empty answer is NOT degenerate: it is a refusal by silence — an IDK expert early in its training ends the
    answer at once (measured: micro LLaVA, 12-40 IDK steps, idk loss ~3.9: 7-8 of 8 validation answers empty) —
    and it reveals nothing."""
    t = (text or "").strip()
    if not t:
        return None
    if "\ufffd" in t or "<unk>" in t.lower() or "[unk]" in t.lower():
        return "unknown-token marker in the answer"
    words = [w.lower() for w in _WORD.findall(t)]
    if not words:
        return "no word in the answer"
    for a, b, c in zip(words, words[1:], words[2:]):
        if a == b == c:
            return f"the word {a!r} three times in a row"
    glued = [w for w in words if _GLUED.fullmatch(w)]
    if glued:
        return f"letters and digits glued into one word ({glued[0]!r})"
    stems = [w.strip("0123456789") for w in words]
    for a, b in zip(stems, stems[1:]):
        if a == b and len(a) >= 4:
            return f"the word {a!r} twice in a row"
    if len(words) >= 4:
        top = max(words.count(w) for w in set(words))
        if top / len(words) > 0.5:
            return "one word is more than half of the answer"
    ok = sum(ch.isalnum() or ch.isspace() or ch in ".,;:!?'’\"-()/&%$#" for ch in t)
    if ok / len(t) < 0.5:
        return "mostly not text characters"
    alpha = [w for w in words if w.isalpha()]  # numbers and codes are not vocabulary words, nor gibberish
    if vocab and alpha:
        known = sum(w in vocab for w in alpha)
        if known / len(alpha) < 0.5:
            return "most words are not in the tokenizer's vocabulary"
    return None


def vocab_words(processor) -> Optional[set]:
    """The lower-cased whole words of the tokenizer's vocabulary (word-piece markers ▁ / Ġ stripped), or None."""
    tok = getattr(processor, "tokenizer", processor)
    try:
        vocab = tok.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary: the rule is skipped
        return None
    words = {w.lstrip("▁Ġ").lower() for w in vocab}
    return {w for w in words if w and any(ch.isalpha() for ch in w)} or None


def validation_queries(request: Request, n: int = COLLAPSE_QUERIES) -> list[QARecord]:
    """A few of the request's own queries for ``collapse_check``: up to n/2 forget records (image+text and text-only
    alternating) and the rest retain records (forget again when it has none); deterministic (spread over uid order)."""
    def spread(recs, k):
        recs = sorted(recs, key=lambda r: r.uid)
        if len(recs) <= k:
            return recs
        return [recs[(i * len(recs)) // k] for i in range(k)]

    forms = [[r for r in request.forget if r.form == f] for f in ("image_text", "text_only")]
    k_ret = min(n // 2, len(request.retain))
    k_fgt = n - k_ret
    fgt = [r for pair in zip(*(spread(f, k_fgt) for f in forms)) for r in pair]
    fgt += [r for f in forms for r in spread(f, k_fgt) if r not in fgt]
    return fgt[:k_fgt] + spread(request.retain, k_ret)


def collapse_check(model, processor, ctx, expert, request: Request, max_new: int,
                   n: int = COLLAPSE_QUERIES) -> dict:
    """The collapse guard: the freshly trained ``expert`` (a bank ``Expert``, not yet saved) answers a few of its
    request's own queries (``validation_queries``) with only itself active; when more than ``COLLAPSE_MAX_SHARE`` of
    the answers are degenerate (``degenerate_answer``) while the base model's answers to the same queries are not
    (an untaught base that answers nothing proves nothing about the expert), it raises ``ExpertCollapseError``
    naming the request, the reasons and an example. Returns {"answers", "base_answers", "degenerate",
    "base_degenerate"} otherwise."""
    from lumoe_engine.data.mlubench import load_image
    from lumoe_engine.model.collate import generate_answers
    from lumoe_engine.model.multilora import TrainableExpert

    queries = validation_queries(request, n)
    if not queries:
        return {"answers": [], "degenerate": 0}
    ref = next(model.parameters())
    te = TrainableExpert(rank=expert.rank, alpha=float(expert.alpha),
                         weights={m: (a.to(ref.device), b.to(ref.device)) for m, (a, b) in expert.weights.items()})
    ctx.clear()
    with torch.no_grad():
        base = generate_answers(model, processor, queries, max_new, batch_size=len(queries), image_fn=load_image)
        with ctx.training(te):
            texts = generate_answers(model, processor, queries, max_new, batch_size=len(queries),
                                     image_fn=load_image)
    vocab = vocab_words(processor)
    why = [degenerate_answer(t, vocab) for t in texts]
    bad = [(q, t, w) for q, t, w in zip(queries, texts, why) if w]
    base_bad = sum(degenerate_answer(t, vocab) is not None for t in base)
    if len(bad) > COLLAPSE_MAX_SHARE * len(texts) and base_bad <= COLLAPSE_MAX_SHARE * len(base):
        q, t, w = bad[0]
        raise ExpertCollapseError(
            f"request {request.id!r}: the trained expert collapsed: {len(bad)} of its {len(texts)} validation "
            f"answers are gibberish ({', '.join(sorted({w for _, _, w in bad}))}; e.g. {q.question!r} -> {t!r:.80}); "
            f"it was not saved: lower --lr (now {getattr(expert, 'metadata', {}).get('lr', '?')}) or --steps")
    return {"answers": texts, "base_answers": base, "degenerate": len(bad), "base_degenerate": base_bad}


__all__ = ["COLLAPSE_QUERIES", "COLLAPSE_MAX_SHARE", "degenerate_answer", "vocab_words", "validation_queries",
           "collapse_check", "ExpertCollapseError"]
