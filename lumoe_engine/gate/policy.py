"""The routing policy of the gate (a ``Gate`` mixin: ``RoutingPolicy``): how the channels combine into one decision
per query.

``route(features, top_k, texts=, has_image=, answers=)``:

1. a query with a picture and the base's answer to it (``answers``, the answer channel: ``gate.recognition``; a
   gate with ``recognition`` on) goes to the experts its prompt names, then those the base's answer names or whose
   request's facts it states (names as text, typo-tolerant; facts exactly: ``gate.names``), as many as ``top_k``,
   else to none; nothing else routes it — except that an answer stating only a fact the request shares with one of
   its negatives (``facts_ambiguous``) goes to that fact's expert(s) whose head fires on the query's features;
2. any other query: the heads' top-k calibrated logits that fire, each choice kept only within its expert's
   similarity bound (``gate.bound``); a query with image columns is routed by the image channel instead when
   the gate has one (``gate.image_channel``);
3. then the names: a prompt that names a request's entity goes to that expert (``text_by_name``: a query without an
   image reaches an expert with names only by naming it).

A query about two forgotten entities (its prompt names one, its picture shows another; or its prompt names both) goes
to both experts, in order of first mention (prompt, then the answer's names, then its facts), equal weights, at most
``top_k`` (top_k = 1: the first). Calibration per channel, on the request's negatives only (never a test query): the
heads at ``target_fpr`` each on held-out negatives; the names on the negatives' texts and the base's answers about
the negatives' pictures (a name whose typo-tolerant match fires on one is matched exactly only; an exact mention of
a forgotten name routes by design, counted in ``HeadReport.name_neg_hits``, not hidden); the facts on the negatives'
own answers and the base's answers to them (a fact one of them states is ambiguous: ``HeadReport.facts_dropped``,
routed only with the expert's head; measured on the development seed 0, gate-eval: the known pictures routed 0.978
without that, 1.000 with it, false positives 0.019 / 0.016 -> 0.021 / 0.023 on retain / never-requested queries).

Name channel (``add_expert(names=...)``): a request gives the names of what it forgets, as text (its entities'
names and the aliases its request lists). ``route(features, texts=...)`` matches them in each query's prompt text
(``gate.names.NameIndex``: case, accents and punctuation normalised, a name's leading article dropped, whole words
only, so "Moon" is not found in "Moonlight" or "honeymoon"; a name of at least ``name_fuzzy_chars`` letters also
matches within ``name_max_edits`` typo; a name inside a longer name matched on the same words is the longer one's)
and sends a query that names a request's entity to that expert whatever its pooled features say: a query that names
the entity is about it, however it is worded (measured on the taught embedded default: text-only queries in the
held-out phrasing family reached the right expert 0.61 of the time through the heads and the bound alone). A query
that names several forgotten entities goes to each of their experts, in order of first mention, equal weights, as
many as ``top_k`` allows (top_k = 1: the first named). The matching is on text, so it does not depend on the
tokenizer (a SentencePiece tokenizer writes a name after "\\n", a quote or a bracket without its leading piece; a
byte-level BPE splits "Moonlight" into "Moon" + "light": neither matters here). Measured by ``gate-eval`` on the
taught embedded default (seed 0, both settings), text-only test queries with the name as people type it (lower
case / without the article before it / one typo / all three; ``evaluate.typed_name_records``): routed 1.0 / 1.0 /
1.0 / 1.0 (the former token-id channel: 0.0 / 1.0 / 0.0 / 0.0), every other form and false-positive rate unchanged
(the test queries write the names exactly). Calibration of the names
(``add_expert(neg_texts=...)``, the request's negatives' prompt texts): a name whose typo-tolerant match fires on a
negative text is matched exactly only from then on (``HeadReport.names_exact_only``); negatives that name it exactly
are counted (``name_neg_hits``), not hidden. With ``text_by_name`` (default), a query without an image reaches an
expert that has names only through them: the heads' choice of such an expert is dropped unless the prompt names it
(on the taught embedded default the heads sent 12% of the text-only queries about never-requested entities to a
request whose entities share their class and wording; a text-only query is about an entity when it names it). Which
rows carry an image: ``route(has_image=...)`` (the engine knows its queries), else the image columns (image
channel); with neither, and for experts without names or queries routed without ``texts``, the heads' decision
stands. Names are saved with the gate as strings (format v4); a v3 file whose names are token ids is refused with
``GateFormatError`` unless ``Gate.load(names=...)`` gives each expert's names as text (the store does so from its
ledger).

Letters: B queries, D feature width (``dim``), F head input width (D or 2 D), E experts, H stacked sub-heads (>= E),
k top-k, P positives (P_max: most prototypes of one expert), Q negatives, S prompt positions.

"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lumoe_engine import ops
from lumoe_engine.gate.heads import check_features
from lumoe_engine.gate.names import NameIndex, normalize_name


class RoutingPolicy:
    """The routing policy's methods (module docstring); the names live on the ``Gate`` (``_names``,
    ``_names_exact``)."""

    def route(self, features: torch.Tensor, top_k: int = 1, renormalize: bool = True,
              texts: Optional[Sequence[str]] = None, has_image=None,
              answers: Optional[Sequence[Optional[str]]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts each query goes to: the ``top_k`` highest calibrated logits that fire, else -1.

        ``ops.topk_routing(scores, top_k, scoring="sigmoid", threshold=0.5)``; with ``renormalize`` (default) the
        surviving weights of a row sum to 1 (top_k = 1: weight 1 for a routed query, 0 for none). Then the
        similarity bound of each chosen expert must hold, else that choice becomes -1 (module docstring). With an
        image channel, a row with an image gets the image channel's expert instead (``route_images``; top-1).
        With no expert in the gate every query gets -1. With ``texts`` (each query's prompt text, as the user wrote
        it: no chat template, no image tokens), a row whose text names an expert's entity (``names``) goes to the
        named expert(s) instead, in order of first mention, weights equal, at most ``top_k``; ``has_image`` ([B]
        bools: which queries carry an image) tells ``text_by_name`` the text-only rows (module docstring).
        With ``answers`` ([B]: the frozen base's own answer to each query with a picture, None for a query without
        one: ``recognition.Recognizer``) and ``recognition`` on, a row with an answer is routed by names and facts
        alone: to the experts named by its prompt, then those the answer names, then those whose facts it states
        (first mention first, as many as ``top_k``), else to none; its features are not scored.
        features: [B, D]        returns weights [B, top_k] fp32, ids [B, top_k] int32 (-1 = no expert)
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k={top_k!r}: expected an int >= 1")
        x = check_features(features, self.feature_width, "features", allow_empty=True, finite=False)
        B, E = x.shape[0], len(self.expert_ids)
        texts = self._check_texts(texts, B)
        if has_image is not None:
            has_image = torch.as_tensor(has_image, dtype=torch.bool).reshape(-1)
            if has_image.shape[0] != B:
                raise ValueError(f"has_image: {has_image.shape[0]} entries for {B} queries; pass one bool per query")
        weights = torch.zeros(B, top_k, dtype=torch.float32, device=x.device)
        ids = torch.full((B, top_k), -1, dtype=torch.int32, device=x.device)
        if E == 0 or B == 0:
            return weights, ids
        if answers is not None and self.recognition:
            ident = self._check_answers(answers, B)
            if any(t is not None for t in ident):
                return self._route_recognised(x, top_k, renormalize, texts, has_image, ident, weights, ids)
        # rows with an image go to the image channel (module docstring); the heads score the others only
        has = self._image_rows(x) if self.img_mean is not None else None
        text_rows = None if has is None else (~has).nonzero().squeeze(1)
        xt = x if text_rows is None else x.index_select(0, text_rows)
        if xt.shape[0]:
            k = min(top_k, E)
            w, i = ops.topk_routing(self.scores(xt), k, renormalize=renormalize, threshold=0.5, scoring="sigmoid")
            if self._pcount and max(self._pcount) > 0:
                w, i = self._veto(xt, w, i, renormalize)
            if text_rows is None:
                weights[:, :k], ids[:, :k] = w, i
            else:
                weights[text_rows, :k], ids[text_rows, :k] = w, i
        if has is not None and bool(has.any()):
            img = self._image_decisions(x[has, self.dim:])
            ids[has, 0] = img.to(ids.dtype)
            weights[has, 0] = (img >= 0).to(weights.dtype)
        if texts is not None and any(self._names):
            # a query without an image reaches an expert with names only by naming it; which rows have an image:
            # has_image (the caller knows), else the image columns (image channel), else unknown (nothing dropped)
            img_rows = has_image if has_image is not None else has
            if self.text_by_name and img_rows is not None:
                named = torch.tensor([bool(n) for n in self._names], device=ids.device)
                drop = (ids >= 0) & named[ids.long().clamp_min(0)] & ~img_rows.to(ids.device).unsqueeze(1)
                if bool(drop.any()):
                    ids = torch.where(drop, torch.full_like(ids, -1), ids)
                    weights = torch.where(drop, torch.zeros_like(weights), weights)
            rows, hit_ids, hit_w = [], [], []
            for b, h in enumerate(self.name_hits(texts)):
                if h:
                    h = h[:top_k]
                    rows.append(b)
                    hit_ids.append(h + [-1] * (top_k - len(h)))
                    hit_w.append([1.0 / len(h) if renormalize else 1.0] * len(h) + [0.0] * (top_k - len(h)))
            if rows:  # one write for every named row
                r = torch.tensor(rows, device=ids.device)
                ids[r] = torch.tensor(hit_ids, dtype=ids.dtype).to(ids.device)
                weights[r] = torch.tensor(hit_w, dtype=weights.dtype).to(weights.device)
        return weights, ids

    def _route_recognised(self, x, top_k, renormalize, texts, has_image, ident, weights, ids):
        """``route`` for a batch where some rows carry the base's answer: those rows by names and facts alone, the
        others by ``route`` as usual (one call on their rows)."""
        rec = [b for b, t in enumerate(ident) if t is not None]
        rest = [b for b, t in enumerate(ident) if t is None]
        if rest:
            sub = torch.tensor(rest, device=x.device)
            w, i = self.route(x.index_select(0, sub), top_k, renormalize,
                              texts=None if texts is None else [texts[b] for b in rest],
                              has_image=None if has_image is None else has_image[sub.cpu()])
            weights[sub], ids[sub] = w, i
        said = self.name_hits([ident[b] for b in rec])
        stated = self.fact_hits([ident[b] for b in rec])
        asked = self.name_hits([texts[b] for b in rec]) if texts is not None else [[] for _ in rec]
        # a row whose answer states only a fact the request shares with its negatives (ambiguous) goes to an expert
        # of that fact whose head fires on it (the features tell which entity it is)
        vague = [j for j in range(len(rec)) if not (asked[j] or said[j] or stated[j])]
        if vague and any(self._facts_ambiguous) and self._n_rows:
            amb = self.fact_hits([ident[rec[j]] for j in vague], ambiguous=True)
            need = [j for j, a in zip(vague, amb) if a]
            if need:
                fire = self.scores(x.index_select(0, torch.tensor([rec[j] for j in need], device=x.device))) >= 0
                for r_, (j, a) in enumerate((j, a) for j, a in zip(vague, amb) if a):
                    stated[j] = [e for e in a if bool(fire[r_, e])]
        for b, a, s, f in zip(rec, asked, said, stated):
            h = list(dict.fromkeys(a + s + f))[:top_k]
            if h:
                ids[b, :len(h)] = torch.tensor(h, dtype=ids.dtype)
                weights[b, :len(h)] = 1.0 / len(h) if renormalize else 1.0
        return weights, ids

    @staticmethod
    def _check_answers(answers, B: int) -> list[Optional[str]]:
        if isinstance(answers, str) or not isinstance(answers, (list, tuple)) or \
                not all(t is None or isinstance(t, str) for t in answers):
            raise ValueError(f"answers: expected a list of the base's answers (a string per query with a picture, "
                             f"None without), got {type(answers).__name__}")
        if len(answers) != B:
            raise ValueError(f"answers: {len(answers)} answers for {B} queries; pass one per query")
        return list(answers)

    @staticmethod
    def _check_texts(texts, B: Optional[int] = None) -> Optional[list[str]]:
        if texts is None:
            return None
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or \
                not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts: expected a list of prompt texts (strings, one per query), got "
                             f"{type(texts).__name__}")
        if B is not None and len(texts) != B:
            raise ValueError(f"texts: {len(texts)} prompt texts for {B} queries; pass one per query")
        return list(texts)

    @property
    def names(self) -> list[list[str]]:
        """Per expert (routing order), its names as text (empty: no name channel for it)."""
        return [list(n) for n in self._names]

    @property
    def names_exact(self) -> list[list[str]]:
        """Per expert, those of its names matched exactly only (calibration: their typo match fired on a negative)."""
        return [list(n) for n in self._names_exact]

    @property
    def name_index(self) -> NameIndex:
        """The ``NameIndex`` of every expert's names (routing ids), built on first use after a change."""
        if self._name_index is None:
            idx = NameIndex(self.name_fuzzy_chars, self.name_max_edits)
            for e, (ns, xs) in enumerate(zip(self._names, self._names_exact)):
                idx.add(ns)
                for x in xs:
                    idx.exact_only(e, normalize_name(x))
            self._name_index = idx
        return self._name_index

    def name_hits(self, texts: Sequence[str]) -> list[list[int]]:
        """Per prompt text, the experts (routing ids) whose names it mentions, in order of first mention."""
        texts = self._check_texts(texts)
        if not any(self._names):
            return [[] for _ in texts]
        idx = self.name_index
        return [idx.find(t) for t in texts]

    def route_ids(self, features: torch.Tensor) -> list[Optional[str]]:
        """Top-1 expert id of each query (None = no expert). features: [B, D]."""
        _, ids = self.route(features, 1)
        return [self.expert_ids[i] if i >= 0 else None for i in ids[:, 0].tolist()]

    @property
    def facts(self) -> list[list[str]]:
        """Per expert (routing order), the facts of its answer channel (empty: none)."""
        return [list(f) for f in self._facts]

    @property
    def fact_blockers(self) -> list[list[str]]:
        """Per expert, the negatives' longer facts that contain one of its facts ("Pedrouth Lighthouse" for
        "lighthouse"): a fact found inside one of them is that longer fact, not the expert's."""
        return [list(b) for b in self._fact_blockers]

    @property
    def facts_ambiguous(self) -> list[list[str]]:
        """Per expert, its request's facts that a negative shares (they route only with the expert's head)."""
        return [list(f) for f in self._facts_ambiguous]

    def _build_fact_index(self, lists) -> NameIndex:
        idx = NameIndex(self.name_fuzzy_chars, 0)
        for fs in lists:
            idx.add(fs)
        idx.add(dict.fromkeys(b for bs in self._fact_blockers for b in bs))
        return idx

    def _fact_indexes(self) -> tuple[NameIndex, NameIndex]:
        """(facts, ambiguous facts) indexes, built on first use after a change."""
        if self._fact_index is None:
            self._fact_index = (self._build_fact_index(self._facts), self._build_fact_index(self._facts_ambiguous))
        return self._fact_index

    @property
    def fact_index(self) -> NameIndex:
        """The exact ``NameIndex`` of every expert's facts (routing ids), and every blocker under one extra index
        (E), built on first use after a change."""
        return self._fact_indexes()[0]

    def fact_hits(self, texts: Sequence[str], ambiguous: bool = False) -> list[list[int]]:
        """Per answer text, the experts (routing ids) whose facts (``ambiguous``: whose shared facts) it states, in
        order of first mention (a fact inside a longer blocker it states does not count)."""
        texts = self._check_texts(texts)
        lists = self._facts_ambiguous if ambiguous else self._facts
        if not any(lists):
            return [[] for _ in texts]
        idx, E = self._fact_indexes()[1 if ambiguous else 0], len(lists)
        return [[e for e in idx.find(t) if e < E] for t in texts]

    @staticmethod
    def _calibrate_facts(facts: list[str], neg_answers: Sequence[str], neg_keys: Sequence[str] = ()
                         ) -> tuple[list[str], list[str], list[str]]:
        """(facts kept, facts dropped, blockers). A fact is dropped when a negative's own fact (``neg_keys``: its
        answer and answer keys) is that fact, or when the base's answer to a negative (``neg_answers``) states it
        outside a blocker; a blocker is a negative's fact that contains a kept fact among other words (it is
        matched as the longer fact: ``names.NameIndex``, the longest match wins)."""
        if not facts:
            return [], [], []
        keys = {normalize_name(k): k for k in neg_keys if normalize_name(k)}
        dropped = [f for f in facts if normalize_name(f) in keys]
        kept = [f for f in facts if f not in dropped]

        def inside(small, big):
            n = len(small)
            return len(big) > n and any(big[i:i + n] == small for i in range(len(big) - n + 1))

        blockers = [k for w, k in keys.items() if any(inside(normalize_name(f), w) for f in kept)]
        if kept and neg_answers:
            idx = NameIndex(10 ** 6, 0)
            idx.add(kept)
            idx.add(blockers)
            words = {" ".join(normalize_name(f)): f for f in kept}
            found = {words[m.name] for t in neg_answers for m in idx.matches(t) if m.expert == 0}
            dropped += [f for f in kept if f in found]
            kept = [f for f in kept if f not in found]
        blockers = [k for k in blockers if any(inside(normalize_name(f), normalize_name(k)) for f in kept)]
        return kept, dropped, blockers

    def _calibrate_names(self, names: list[str], neg_texts: Sequence[str]) -> tuple[list[str], int]:
        """(the names whose typo-tolerant match fires on one of ``neg_texts``: matched exactly only, the number of
        ``neg_texts`` that name one of ``names`` exactly)."""
        if not names or not neg_texts:
            return [], 0
        idx = NameIndex(self.name_fuzzy_chars, self.name_max_edits)
        idx.add(names)
        by_words = {" ".join(normalize_name(n)): n for n in names}
        fuzzy, hits = [], 0
        for t in neg_texts:
            ms = idx.matches(t)
            hits += any(m.distance == 0 for m in ms)
            for m in ms:
                if m.distance > 0 and by_words[m.name] not in fuzzy:
                    fuzzy.append(by_words[m.name])
        return [n for n in names if n in fuzzy], hits


__all__ = ["RoutingPolicy"]
