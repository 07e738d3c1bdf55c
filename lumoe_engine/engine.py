"""The mixed-batch inference engine: one forward pass routes every query to its experts (or none) and generates.

``LUMoEEngine(model, processor, bank, gate)`` wraps the language model's target linears above the gate layer L with
``MultiLoRALinear`` (``lumoe_engine.model.multilora``). For a batch of queries (image or None, question):

1. the prompts are batched exactly as training and evaluation batch them (``lumoe_engine.model.collate``: chat
   template, the processor for images, left padding);
2. routing: explicit ``expert_ids`` per query, if given; otherwise, during the prefill forward, a hook on decoder
   layer L pools that layer's output over the prompt positions (``gate.pool``), scores it (``gate.route``, given
   the prompts' texts for its name channel), makes the chosen experts resident (``bank.ensure_resident``) and sets
   the routing before layer L+1 runs: the experts act on the layers above L of the *same* forward pass, so routing
   costs no second pass. Layers up to L are the base model's, so the gate always reads base features;
3. greedy decoding (``model.generate``, KV cache, batched): decode steps reuse each query's routing; the routing
   metadata of a step shape is built once and shared by every wrapped linear.
A batch mixes queries for different experts and for none; a query whose routing is empty gets the base model's
output. ``score`` runs the same routing over prompt + answer (teacher forcing) and returns the answers' log-probs.

Gate interface (``GateProtocol``, which ``lumoe_engine.gate.gate.Gate`` implements): ``gate.layer`` (int L),
``gate.expert_ids`` (list of str: the expert of each gate index), ``gate.pool(hidden [B, S, D], attention_mask
[B, S], input_ids=[B, S]) -> [B, D']`` (the prompt ids locate the image positions of an image channel) and
``gate.route(features [B, D'], top_k=k, texts=[B prompt texts], has_image=[B bools]) -> (weights [B, k] fp32,
ids [B, k] int, -1 = none)``: the queries' prompt texts as the caller gave them (the question, without the chat
template or image tokens: what a name channel matches) and which queries carry an image.

Letters: B queries, S prompt positions, D hidden size, k experts per query.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch
from PIL import Image

from lumoe_engine.data.records import QARecord
from lumoe_engine.model.bank import ExpertBank
from lumoe_engine.model.collate import IGNORE, collate
from lumoe_engine.model.multilora import (DEFAULT_TARGETS, LoRAContext, find_decoder_layers, get_context,
                                          unwrap_model, wrap_model)


class GateProtocol(Protocol):
    """What the engine needs of a gate (module docstring); ``lumoe_engine.gate.gate.Gate`` is the implementation."""

    layer: int
    expert_ids: list

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
             input_ids: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def route(self, features: torch.Tensor, top_k: int = 1, renormalize: bool = True,
              texts: Optional[Sequence[str]] = None, has_image: Optional[Sequence[bool]] = None,
              answers: Optional[Sequence[Optional[str]]] = None) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class RoutingDecision:
    """Where one query went: expert ids (empty = the base model) with their weights; source "given" (explicit
    expert_ids), "gate", or "none" (no gate and no ids)."""

    expert_ids: tuple[str, ...]
    weights: tuple[float, ...]
    source: str


@dataclass
class GenerationResult:
    """texts: the decoded answers (special tokens removed, stripped); token_ids: the new tokens of each query up
    to its first eos (excluded); routing: one ``RoutingDecision`` per query."""

    texts: list[str]
    routing: list[RoutingDecision]
    token_ids: list[list[int]]


@dataclass
class ScoreResult:
    """logprobs: per query, the sum of log p(answer token | prefix) over the answer tokens and the closing eos;
    token_counts: how many tokens that sum covers; routing: one ``RoutingDecision`` per query."""

    logprobs: list[float]
    token_counts: list[int]
    routing: list[RoutingDecision]


@dataclass
class _Pending:
    """Gate routing wanted at the next prefill: prompt positions to pool, positions that get experts."""

    prompt_mask: torch.Tensor   # [B, S] 1 on prompt tokens (what the gate pools)
    token_mask: torch.Tensor    # [B, S] 1 on real tokens (what experts apply to)
    input_ids: Optional[torch.Tensor] = None  # [B, S] the prompt ids (the gate's image positions)
    texts: Optional[list] = None              # [B] the prompt texts as given (the gate's name channel)
    has_image: Optional[list] = None          # [B] which queries carry an image
    answers: Optional[list] = None            # [B] the base's own answer per query with a picture (answer channel)
    decisions: Optional[list[RoutingDecision]] = None


def query_records(prompts: Sequence[str], images: Sequence[Optional[Image.Image]],
                   answers: Optional[Sequence[str]] = None) -> list[QARecord]:
    """Queries as ``QARecord`` rows for ``collate`` (form ``image_text`` where an image is given, else
    ``text_only``); the records carry no entity: they exist only to be batched."""
    return [QARecord(uid=f"query{i}", entity="", cls="", kind=0, phrasing=0, question=q,
                     answer=answers[i] if answers is not None else "",
                     form="image_text" if im is not None else "text_only")
            for i, (q, im) in enumerate(zip(prompts, images))]


class LUMoEEngine:
    """Mixed-batch generation and scoring over a frozen base with routed LoRA experts (see the module docstring).

    model:      a LLaVA / LLaVA-NeXT (or causal LM) model, fp32/bf16/fp16 or 4-bit (bitsandbytes Linear4bit)
    processor:  its processor (tokenizer + image processor)
    bank:       the ``ExpertBank`` of the experts (module names as in ``model.named_modules()``)
    gate:       a ``GateProtocol``; routes queries when ``expert_ids`` is not given (None: only explicit ids route)
    gate_layer: L, experts act on decoder layers > L; default ``gate.layer``, or -1 (all layers) without a gate
    top_k:      at most this many experts per query (the gate's first top_k choices, by weight)
    targets:    short names of the wrapped linears in each decoder layer
    recognizer: lets the base answer each query with a picture first, for a gate with ``recognition`` on (the
                answer channel: ``gate.recognition.Recognizer``; default: one over this model, every expert off)
    The model is wrapped in place (``close()`` unwraps it); a model already wrapped for ``bank`` is reused as is.
    """

    def __init__(self, model, processor, bank: ExpertBank, gate=None, gate_layer: Optional[int] = None,
                 top_k: int = 1, targets: Sequence[str] = DEFAULT_TARGETS, block_m: int = 16,
                 recognizer=None) -> None:
        if not isinstance(bank, ExpertBank):
            raise ValueError(f"bank: expected an ExpertBank, got {type(bank).__name__}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")
        _, decoder = find_decoder_layers(model)
        n_layers = len(decoder)
        if gate is not None:
            for attr in ("layer", "expert_ids", "pool", "route"):
                if not hasattr(gate, attr):
                    raise ValueError(f"gate: {type(gate).__name__} has no {attr!r}; a gate needs layer, expert_ids, "
                                     f"pool(hidden, attention_mask) and route(features)")
            if gate_layer is not None and gate_layer != gate.layer:
                raise ValueError(f"gate_layer={gate_layer} but gate.layer={gate.layer}: the gate reads the layer it "
                                 f"was trained on; leave gate_layer=None")
            gate_layer = int(gate.layer)
        elif gate_layer is None:
            gate_layer = -1
        if isinstance(gate_layer, bool) or not isinstance(gate_layer, int) or not -1 <= gate_layer < n_layers - 1:
            raise ValueError(f"gate_layer: expected an int in [-1, {n_layers - 2}] (experts act on layers above it; "
                             f"the model has {n_layers} decoder layers), got {gate_layer!r}")
        if gate is not None and gate_layer < 0:
            raise ValueError(f"gate.layer={gate_layer}: the gate must read a decoder layer (0..{n_layers - 2})")
        self.model, self.processor, self.bank, self.gate = model, processor, bank, gate
        self.gate_layer, self.top_k = gate_layer, top_k
        self.tokenizer = getattr(processor, "tokenizer", processor)
        existing = get_context(model)
        if existing is not None:
            if existing.bank is not bank:
                raise ValueError("model is already wrapped for another ExpertBank; unwrap_model(model) first")
            self.ctx: LoRAContext = existing
            self._owns_wrap = False
        else:
            self.ctx = wrap_model(model, bank, targets=targets, layers=range(gate_layer + 1, n_layers),
                                  block_m=block_m)
            self._owns_wrap = True
        self._pending: Optional[_Pending] = None
        self.recognizer = None
        if gate is not None and getattr(gate, "recognition", False):
            from lumoe_engine.gate.recognition import Recognizer

            self.recognizer = recognizer if recognizer is not None else Recognizer(model, processor, self.ctx)
        self._hook = decoder[gate_layer].register_forward_hook(self._gate_hook) if gate is not None else None

    # ------------------------------------------------------------------------------------------------- public
    @torch.no_grad()
    def generate(self, images: Sequence[Optional[Image.Image]], prompts: Sequence[str], max_new_tokens: int = 32,
                 expert_ids=None, min_new_tokens: int = 0, batch_size: Optional[int] = None) -> GenerationResult:
        """Greedy answers to ``prompts`` (with ``images[i]``, or text-only where None), all in one mixed batch
        (or in chunks of ``batch_size``).

        expert_ids: None (the gate routes; without a gate, the base model answers), or one entry per query: None
        (base model), an expert id, or a list of expert ids (weight 1 each) — overrides the gate.
        min_new_tokens: force at least this many new tokens (fixed-length benchmarks).
        """
        n = self._check_queries(images, prompts)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        given = self._normalise_ids(expert_ids, n)
        texts, routing, tokens = [], [], []
        step = batch_size or max(n, 1)
        for s in range(0, n, step):
            sl = slice(s, s + step)
            t, r, k = self._generate_batch(list(images[sl]), list(prompts[sl]), max_new_tokens, min_new_tokens,
                                           given[sl] if given is not None else None)
            texts += t
            routing += r
            tokens += k
        return GenerationResult(texts=texts, routing=routing, token_ids=tokens)

    @torch.no_grad()
    def score(self, images: Sequence[Optional[Image.Image]], prompts: Sequence[str], answers: Sequence[str],
              expert_ids=None, batch_size: Optional[int] = None) -> ScoreResult:
        """Log-probability of each answer given its query, under the query's routing (same rules as ``generate``;
        the gate pools the prompt positions only, so it routes exactly as for generation)."""
        n = self._check_queries(images, prompts)
        if len(answers) != n or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"answers: expected {n} strings (one per prompt), got {len(answers)} items")
        given = self._normalise_ids(expert_ids, n)
        lps, counts, routing = [], [], []
        step = batch_size or max(n, 1)
        for s in range(0, n, step):
            sl = slice(s, s + step)
            a, b, c = self._score_batch(list(images[sl]), list(prompts[sl]), list(answers[sl]),
                                        given[sl] if given is not None else None)
            lps += a
            counts += b
            routing += c
        return ScoreResult(logprobs=lps, token_counts=counts, routing=routing)

    def close(self) -> None:
        """Remove the gate hook and, if this engine wrapped the model, unwrap it."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._owns_wrap and get_context(self.model) is self.ctx:
            unwrap_model(self.model)
        self._owns_wrap = False

    # ------------------------------------------------------------------------------------------------- batches
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _float_dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.dtype.is_floating_point:
                return p.dtype
        return torch.float32

    def _batch(self, images, prompts, answers=None) -> dict[str, torch.Tensor]:
        records = query_records(prompts, images, answers)
        batch = collate(records, self.processor, with_answers=answers is not None, images=images)
        device = self._device()
        batch = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self._float_dtype())
        return batch

    def _route(self, given, attention_mask: torch.Tensor, prompt_mask: torch.Tensor,
               input_ids: Optional[torch.Tensor] = None, texts: Optional[Sequence[str]] = None,
               images: Optional[Sequence] = None) -> Optional[list]:
        """Set the context for the next forward: explicit routing now (returns its decisions), or gate routing at
        the prefill hook (returns None; the hook fills the decisions), or none. texts / images: the batch's prompts
        as the caller gave them and its images (None: text-only), in batch order, for the gate."""
        self.ctx.clear()
        self._pending = None
        batch = attention_mask.shape[0]
        if given is not None:
            slots, weights, decisions = self._given_routing(given)
            self.ctx.set_routing(slots, weights, token_mask=attention_mask)
            return decisions
        if self.gate is not None:
            answers = None
            if self.recognizer is not None and images is not None and any(im is not None for im in images):
                # the base alone answers the queries with a picture, before this batch's routing
                answers = self.recognizer.answer(list(images), list(texts) if texts is not None else
                                                 [""] * len(images))
                self.ctx.clear()
            self._pending = _Pending(prompt_mask=prompt_mask, token_mask=attention_mask, input_ids=input_ids,
                                     texts=None if texts is None else list(texts),
                                     has_image=None if images is None else [im is not None for im in images],
                                     answers=answers)
            return None
        return [RoutingDecision((), (), "none")] * batch

    def _cleanup(self) -> Optional[_Pending]:
        """Clear the routing after a batch (also on errors); returns the gate's pending state."""
        pending, self._pending = self._pending, None
        self.ctx.clear()
        return pending

    def _gate_decisions(self, pending: Optional[_Pending]) -> list[RoutingDecision]:
        if pending is None or pending.decisions is None:
            raise RuntimeError(f"the gate hook on decoder layer {self.gate_layer} did not run during the prefill "
                               f"forward; was the model's forward bypassed?")
        return pending.decisions

    def _generate_batch(self, images, prompts, max_new_tokens, min_new_tokens, given):
        batch = self._batch(images, prompts)
        batch.pop("position_ids")  # generate derives the same positions from the attention mask
        am = batch["attention_mask"]
        decisions = self._route(given, am, am, batch["input_ids"], prompts, images)
        tok = self.tokenizer
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if min_new_tokens:
            kwargs["min_new_tokens"] = int(min_new_tokens)
        try:
            out = self.model.generate(**batch, **kwargs)
        finally:
            pending = self._cleanup()
        if decisions is None:
            decisions = self._gate_decisions(pending)
        new = out[:, batch["input_ids"].shape[1]:]
        texts = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        tokens = []
        for row in new.tolist():
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            tokens.append(row)
        return texts, decisions, tokens

    def _score_batch(self, images, prompts, answers, given):
        batch = self._batch(images, prompts, answers)
        labels = batch.pop("labels")
        am = batch["attention_mask"]
        prompt_mask = am * (labels == IGNORE).to(am.dtype)
        decisions = self._route(given, am, prompt_mask, batch["input_ids"], prompts, images)
        try:
            logits = self.model(**batch).logits
        finally:
            pending = self._cleanup()
        if decisions is None:
            decisions = self._gate_decisions(pending)
        target = labels[:, 1:]
        keep = target != IGNORE
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        sums = (picked * keep).sum(dim=1)
        return sums.tolist(), keep.sum(dim=1).tolist(), decisions

    # ------------------------------------------------------------------------------------------------- routing
    def _gate_hook(self, module, args, output):
        pending = self._pending
        if pending is None or pending.decisions is not None:
            return None
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if tuple(hidden.shape[:2]) != tuple(pending.prompt_mask.shape):
            return None  # not the prefill step of this batch
        features = self.gate.pool(hidden, pending.prompt_mask, input_ids=pending.input_ids)
        extra = {} if pending.answers is None else {"answers": pending.answers}
        weights, ids = self.gate.route(features, top_k=self.top_k, texts=pending.texts, has_image=pending.has_image,
                                       **extra)
        weights, ids = weights[:, :self.top_k], ids[:, :self.top_k]
        slots, w, decisions = self._gate_routing(weights, ids)
        pending.decisions = decisions
        self.ctx.set_routing(slots, w, token_mask=pending.token_mask)
        return None

    def _gate_routing(self, weights: torch.Tensor, ids: torch.Tensor):
        """Gate indices -> bank slots (making the experts resident) and per-query decisions; one host read."""
        gate_ids = list(self.gate.expert_ids)
        ids_h = ids.to("cpu", torch.long).tolist()
        w_h = weights.to("cpu", torch.float32).tolist()
        names = []
        for row in ids_h:
            for i in row:
                if i >= len(gate_ids) or i < -1:
                    raise ValueError(f"gate.route returned id {i}, outside [-1, {len(gate_ids)}) "
                                     f"(gate.expert_ids has {len(gate_ids)} entries)")
            names.append([gate_ids[i] if i >= 0 else None for i in row])
        flat = [nm for row in names for nm in row]
        slots = self.bank.ensure_resident(flat).view(len(names), -1) if flat else \
            torch.full((len(names), 1), -1, dtype=torch.long)
        decisions = [RoutingDecision(tuple(nm for nm in row if nm is not None),
                                     tuple(float(w) for nm, w in zip(row, wr) if nm is not None), "gate")
                     for row, wr in zip(names, w_h)]
        return slots, torch.tensor(w_h, dtype=torch.float32), decisions

    def _given_routing(self, given: list[list[str]]):
        k = max(1, max((len(g) for g in given), default=1))
        rows = [list(g) + [None] * (k - len(g)) for g in given]
        flat = [nm for row in rows for nm in row]
        slots = self.bank.ensure_resident(flat).view(len(rows), k)
        weights = torch.tensor([[1.0 if nm is not None else 0.0 for nm in row] for row in rows])
        decisions = [RoutingDecision(tuple(g), tuple(1.0 for _ in g), "given") for g in given]
        return slots, weights, decisions

    def _normalise_ids(self, expert_ids, n: int) -> Optional[list[list[str]]]:
        if expert_ids is None:
            return None
        if isinstance(expert_ids, str) or len(expert_ids) != n:
            raise ValueError(f"expert_ids: expected a list of {n} entries (None, an expert id, or a list of ids per "
                             f"query), got {expert_ids!r:.80}")
        out = []
        for i, e in enumerate(expert_ids):
            if e is None:
                out.append([])
            elif isinstance(e, str):
                out.append([e])
            elif isinstance(e, (list, tuple)) and all(isinstance(x, str) for x in e):
                if len(set(e)) != len(e):
                    raise ValueError(f"expert_ids[{i}]: {list(e)} names an expert twice")
                out.append(list(e))
            else:
                raise ValueError(f"expert_ids[{i}]: expected None, an expert id string or a list of them, got {e!r}")
            for x in out[-1]:
                if x not in self.bank:
                    raise ValueError(f"expert_ids[{i}]: unknown expert {x!r}; the bank holds {len(self.bank)} "
                                     f"experts (bank.ids)")
        return out

    @staticmethod
    def _check_queries(images, prompts) -> int:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts: expected a list of question strings")
        if len(images) != len(prompts):
            raise ValueError(f"images: {len(images)} entries for {len(prompts)} prompts; pass one PIL image (or None "
                             f"for a text-only query) per prompt")
        for i, im in enumerate(images):
            if im is not None and not isinstance(im, Image.Image):
                raise ValueError(f"images[{i}]: expected a PIL image or None, got {type(im).__name__}")
        if not prompts:
            raise ValueError("prompts: empty batch; pass at least one query")
        return len(prompts)
