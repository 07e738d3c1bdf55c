"""The collapse guard: a freshly trained expert must still answer like a working model on its own request's queries.

``collapse_check`` runs the new expert (not yet saved) on a few of its request's queries (``validation_queries``)
and raises ``ExpertCollapseError`` when most answers are gibberish (``eval.judge.degenerate_answer``) while the base
model's are not; the request then fails alone and nothing of it reaches the bank or the gate. The pipeline
(``lumoe_engine.pipeline``) calls it for every request, from a stream or a store.
"""
from __future__ import annotations

import torch

from lumoe_engine.data.records import QARecord
from lumoe_engine.data.streams import Request
from lumoe_engine.errors import ExpertCollapseError
from lumoe_engine.eval.judge import degenerate_answer, vocab_words

COLLAPSE_QUERIES = 8        # validation queries per expert: half forget (both forms), half retain when it has any
COLLAPSE_MAX_SHARE = 0.5    # the expert collapsed when more than this share of its answers is degenerate


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
    the answers are degenerate (``eval.judge.degenerate_answer``) while the base model's answers to the same queries are not
    (an untaught base that answers nothing proves nothing about the expert), it raises ``ExpertCollapseError``
    naming the request, the reasons and an example. The base answers only when the expert's answers are suspect (the
    decision is the same; on a 4096-wide base this halves the guard's cost). Returns {"answers", "base_answers",
    "degenerate", "base_degenerate"} otherwise (the last two None when the base was not asked)."""
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
    with torch.no_grad(), ctx.training(te):
        texts = generate_answers(model, processor, queries, max_new, batch_size=len(queries), image_fn=load_image)
    vocab = vocab_words(processor)
    why = [degenerate_answer(t, vocab) for t in texts]
    bad = [(q, t, w) for q, t, w in zip(queries, texts, why) if w]
    if len(bad) <= COLLAPSE_MAX_SHARE * len(texts):
        return {"answers": texts, "base_answers": None, "degenerate": len(bad), "base_degenerate": None}
    ctx.clear()
    with torch.no_grad():
        base = generate_answers(model, processor, queries, max_new, batch_size=len(queries), image_fn=load_image)
    base_bad = sum(degenerate_answer(t, vocab) is not None for t in base)
    if base_bad <= COLLAPSE_MAX_SHARE * len(base):
        q, t, w = bad[0]
        raise ExpertCollapseError(
            f"request {request.id!r}: the trained expert collapsed: {len(bad)} of its {len(texts)} validation "
            f"answers are gibberish ({', '.join(sorted({w for _, _, w in bad}))}; e.g. {q.question!r} -> {t!r:.80}); "
            f"it was not saved: lower --lr (now {getattr(expert, 'metadata', {}).get('lr', '?')}) or --steps")
    return {"answers": texts, "base_answers": base, "degenerate": len(bad), "base_degenerate": base_bad}


__all__ = ["COLLAPSE_QUERIES", "COLLAPSE_MAX_SHARE", "validation_queries", "collapse_check", "ExpertCollapseError",
           "degenerate_answer"]
