"""The gate: which expert(s) each query goes to, or none. One ``Gate`` object, its rooms in this package:

- ``gate.heads``: one small learned head per expert over the base model's own pooled hidden state (fit and
  calibration, pure functions) — they route queries of experts without names, and are the ``features`` ablation;
- ``gate.bound``: the similarity bound on the heads' choices;
- ``gate.names``: names matched as normalised, word-bounded, typo-tolerant text (``NameIndex``, ``check_names``);
- ``gate.recognition``: the base's own answer to an identity question about a query's picture (``Recognizer``);
- ``gate.image_channel``: the nearest stored picture (the "lookup" ablation);
- ``gate.policy``: how the channels combine into one decision (``route``), two forgotten entities included;
- ``gate.storage``: save / load, format versions;
- ``gate.config``: ``GateConfig`` and presets; ``gate.features``: pooling; ``gate.evaluate``: ``gate-eval``.

Local and lifelong: each request adds one entry (``add_expert``: its names, its head, its prototypes), trained on
that request's queries against retain queries and other requests' queries; old entries are never refitted, and
revoking a request removes its entry. The default path (``GateConfig``) routes by names alone: a query with a
picture by the names in its prompt and in the base's answer about its picture, a text-only query by the names in
its prompt; nothing in it is frozen from the first request (names are text; the base's recognition is the base's).

Letters: B queries, D feature width (``dim``), F head input width (D or 2 D), E experts, H stacked sub-heads (>= E),
k top-k, P positives (P_max: most prototypes of one expert), Q negatives, S prompt positions.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from lumoe_engine.gate import features as _features
from lumoe_engine.gate.bound import SimilarityBound
from lumoe_engine.gate.config import HEADS
from lumoe_engine.gate.heads import (HeadReport, calibrate_threshold, calibration_split, check_features,  # noqa: F401
                                     cover_prototypes, fit_logistic, principal_directions)
from lumoe_engine.gate.image_channel import ImageChannel
from lumoe_engine.gate.names import NameIndex, check_names, normalize_name  # noqa: F401
from lumoe_engine.gate.policy import RoutingPolicy
from lumoe_engine.gate.storage import (GATE_FORMAT, GATE_FORMAT_VERSION, GATE_JSON, GateFormatError,  # noqa: F401
                                       load_gate, save_gate)
from lumoe_engine.fileio import validate_expert_id
from lumoe_engine.model.bank import UnknownExpertError
from lumoe_engine.seeding import stable_seed


class Gate(RoutingPolicy, SimilarityBound, ImageChannel):
    """Per-expert calibrated heads over pooled hidden states of decoder layer ``layer``; routes queries to experts.

    layer: the decoder layer whose output the features pool (0-based)
    dim: feature width D (``features.pooled_dim(hidden, pooling)``)
    pooling: ``features.POOLINGS`` mode used by ``pool``
    head: "linear" (logistic regression on z) or "quadratic" (on [z, z*z])
    target_fpr: calibration target on the held-out negatives of each head
    calib_share: share of each request's negatives (and positives) held out of the fit for calibration
    l2: L2 weight of the logistic fit (on standardised inputs); seed: the calibration splits
    similarity: the cosine bound of the similarity check (module docstring; None = no bound); n_protos: prototypes kept
        per positive group; sim_quantile: the held-out positives' quantile that may lower an expert's bound (None:
        the bound is ``similarity`` for every expert); bound_dim: the bound compares queries in the top ``bound_dim``
        principal directions of the standardised features (fitted with the standardiser; None: all D)

    An expert has one head, or one sub-head per group of its positives (``add_expert(pos_groups=...)``); its score
    is the maximum of its sub-heads' calibrated logits. Sub-heads are stacked rows like heads (``owner`` maps rows to
    experts).
    """

    def __init__(self, layer: int, dim: int, pooling: str = "mean", head: str = "linear", target_fpr: float = 0.001,
                 calib_share: float = 0.25, l2: float = 1e-3, seed: int = 0, max_iter: int = 200,
                 similarity: Optional[float] = 0.9, n_protos: int = 64, sim_quantile: Optional[float] = 0.02,
                 bound_dim: Optional[int] = 128, image_dim: int = 0, image_token_id: Optional[int] = None,
                 image_bound_dim: Optional[int] = 128, n_image_protos: int = 16, image_floor: float = 0.9,
                 image_similarity: float = 0.95, image_candidates: int = 4, text_by_name: bool = True,
                 image_slack: float = 1.0, name_fuzzy_chars: int = 6, name_max_edits: int = 1,
                 recognition: bool = False):
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer={layer!r}: expected an int >= 0 (a decoder layer index)")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim={dim!r}: expected an int >= 1 (the feature width)")
        if pooling not in _features.POOLINGS:
            raise ValueError(f"pooling={pooling!r}: expected one of {_features.POOLINGS}")
        if head not in HEADS:
            raise ValueError(f"head={head!r}: expected one of {HEADS}")
        if not 0.0 <= float(target_fpr) < 1.0:
            raise ValueError(f"target_fpr={target_fpr!r}: expected a rate in [0, 1), e.g. 0.005")
        if not 0.0 <= float(calib_share) < 1.0:
            raise ValueError(f"calib_share={calib_share!r}: expected a share in [0, 1), e.g. 0.25")
        if not float(l2) >= 0.0:
            raise ValueError(f"l2={l2!r}: expected >= 0")
        if similarity is not None and not -1.0 <= float(similarity) <= 1.0:
            raise ValueError(f"similarity={similarity!r}: expected a cosine in [-1, 1] (e.g. 0.9) or None (no bound)")
        if isinstance(n_protos, bool) or not isinstance(n_protos, int) or n_protos < 1:
            raise ValueError(f"n_protos={n_protos!r}: expected an int >= 1 (prototypes per positive group)")
        self.layer, self.dim, self.pooling, self.head = layer, dim, pooling, head
        self.target_fpr, self.calib_share, self.l2 = float(target_fpr), float(calib_share), float(l2)
        self.seed, self.max_iter = int(seed), int(max_iter)
        self.similarity = None if similarity is None else float(similarity)
        self.n_protos = int(n_protos)
        if sim_quantile is not None and not 0.0 <= float(sim_quantile) <= 1.0:
            raise ValueError(f"sim_quantile={sim_quantile!r}: expected a quantile in [0, 1] or None")
        self.sim_quantile = None if sim_quantile is None else float(sim_quantile)
        if bound_dim is not None and (isinstance(bound_dim, bool) or not isinstance(bound_dim, int) or bound_dim < 1):
            raise ValueError(f"bound_dim={bound_dim!r}: expected an int >= 1 or None (no projection)")
        self.bound_dim = bound_dim
        if isinstance(image_dim, bool) or not isinstance(image_dim, int) or image_dim < 0:
            raise ValueError(f"image_dim={image_dim!r}: expected an int >= 0 (0: no image channel)")
        if image_token_id is not None and (isinstance(image_token_id, bool) or not isinstance(image_token_id, int)):
            raise ValueError(f"image_token_id={image_token_id!r}: expected an int token id or None")
        if image_bound_dim is not None and (isinstance(image_bound_dim, bool) or not isinstance(image_bound_dim, int)
                                            or image_bound_dim < 1):
            raise ValueError(f"image_bound_dim={image_bound_dim!r}: expected an int >= 1 or None")
        if isinstance(n_image_protos, bool) or not isinstance(n_image_protos, int) or n_image_protos < 1:
            raise ValueError(f"n_image_protos={n_image_protos!r}: expected an int >= 1")
        for nm, v in (("image_floor", image_floor), ("image_similarity", image_similarity)):
            if not -1.0 <= float(v) <= 1.0:
                raise ValueError(f"{nm}={v!r}: expected a cosine in [-1, 1]")
        self.image_dim, self.image_token_id, self.image_bound_dim = image_dim, image_token_id, image_bound_dim
        if isinstance(image_candidates, bool) or not isinstance(image_candidates, int) or image_candidates < 1:
            raise ValueError(f"image_candidates={image_candidates!r}: expected an int >= 1")
        self.n_image_protos, self.image_floor, self.image_similarity = n_image_protos, float(image_floor), \
            float(image_similarity)
        self.image_candidates = image_candidates
        self.text_by_name = bool(text_by_name)
        self.recognition = bool(recognition)
        if not float(image_slack) > 0:
            raise ValueError(f"image_slack={image_slack!r}: expected > 0 (1: the weakest neighbour's distance)")
        self.image_slack = float(image_slack)
        NameIndex(name_fuzzy_chars, name_max_edits)  # validates both
        self.name_fuzzy_chars, self.name_max_edits = int(name_fuzzy_chars), int(name_max_edits)
        self.img_mean: Optional[torch.Tensor] = None   # [D_img] image standardiser (frozen once set)
        self.img_std: Optional[torch.Tensor] = None
        self.img_basis: Optional[torch.Tensor] = None  # [D_img, D_bi] principal directions (None: no projection)
        self._IP = torch.zeros(0, 0)                   # [n, D_bi] image prototypes, experts contiguous, groups too
        self._igroups: list[list[tuple[int, float]]] = []  # per expert: (prototypes, tau) per positive group
        self._BG = torch.zeros(0, 0)                   # [n_bg, D_bi] background: negatives' images of no expert
        self._img_cache = None                         # (P [n + n_bg, D_bi], owner [.], tau [.]) for routing
        self.expert_ids: list[str] = []
        self.reports: dict[str, HeadReport] = {}
        self.mean: Optional[torch.Tensor] = None  # [D] gate-wide feature standardiser (frozen once set)
        self.basis: Optional[torch.Tensor] = None  # [D, D_b] principal directions of z for the similarity bound
        self.std: Optional[torch.Tensor] = None   # [D]
        F = self.head_dim
        # stacked sub-heads, H rows in use ([:H]); the rows of one expert are contiguous, experts in routing order
        self._W = torch.zeros(0, F)     # [capacity, F]
        self._b = torch.zeros(0)        # [capacity] calibrated bias (threshold folded in)
        self._thr = torch.zeros(0)      # [capacity] thresholds of the uncalibrated logits (for reports)
        self._owner = torch.zeros(0, dtype=torch.long)  # [capacity] expert index of each row
        self._n_rows = 0
        self._heads: list[int] = []     # sub-heads per expert
        # similarity bound: unit prototypes of every expert, contiguous in routing order
        self._P = torch.zeros(0, dim)   # [capacity, D_b]
        self._pcount: list[int] = []    # prototypes per expert (0: no bound for it)
        self._tau: list[float] = []     # cosine bound per expert
        self._bound_cache = None        # (start [E], count [E], tau [E]) tensors, rebuilt after changes
        # name channel: per expert its names (text) and those matched exactly only; the NameIndex built lazily
        self._names: list[list[str]] = []
        self._names_exact: list[list[str]] = []
        self._name_index: Optional[NameIndex] = None
        # answer channel: per expert the facts its request forgets (answer keys), matched exactly in the base's
        # answers (gate.policy); the index built lazily
        self._facts: list[list[str]] = []
        self._fact_blockers: list[list[str]] = []
        self._facts_ambiguous: list[list[str]] = []
        self._fact_index = None  # (facts index, ambiguous facts index), built lazily

    @classmethod
    def from_config(cls, config, model) -> "Gate":
        """A new, empty gate for ``model`` by ``config`` (``GateConfig``): the resolved layer, the pooled width of its
        language model, its image token id (the image channel finds the image positions by it) and, with ``config.image``, the
        image channel ([mean, max] of layer L's image states: 2 H columns, H the language model's hidden size)."""
        config.validate()
        layer = config.resolve_layer(len(_features.decoder_layers(model)))
        hidden = model.config.get_text_config().hidden_size
        image_id = _features.image_token_id_of(model)
        return cls(layer=layer, dim=_features.pooled_dim(hidden, config.pooling), image_token_id=image_id,
                   image_dim=2 * hidden if config.image and image_id is not None else 0, **config.gate_kwargs())

    # ------------------------------------------------------------------------------------------------ state
    def __len__(self) -> int:
        return len(self.expert_ids)

    def __contains__(self, expert_id: object) -> bool:
        return expert_id in self.expert_ids

    @property
    def num_experts(self) -> int:
        return len(self.expert_ids)

    @property
    def head_dim(self) -> int:
        """F: the width of a head's input ``phi(z)``."""
        return self.dim * (2 if self.head == "quadratic" else 1)

    @property
    def feature_width(self) -> int:
        """Columns of the features the gate takes: D pooled (+ ``image_dim`` image columns)."""
        return self.dim + self.image_dim

    def _text(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :self.dim] if self.image_dim else x

    def _image_rows(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """[B] bool: rows with an image (non-zero image columns); None without an image channel."""
        if not self.image_dim:
            return None
        return x[:, self.dim:].abs().amax(1) > 0

    @property
    def num_heads(self) -> int:
        """H: stacked sub-heads (= E when every expert has one)."""
        return self._n_rows

    @property
    def weight(self) -> torch.Tensor:
        """[H, F] fp32 stacked sub-head weights (a view; H = E when every expert has one head)."""
        return self._W[:self._n_rows]

    @property
    def bias(self) -> torch.Tensor:
        """[H] fp32 calibrated biases (each sub-head's threshold subtracted; a view)."""
        return self._b[:self._n_rows]

    @property
    def thresholds(self) -> torch.Tensor:
        """[H] fp32 thresholds of the uncalibrated logits (a view)."""
        return self._thr[:self._n_rows]

    @property
    def owner(self) -> torch.Tensor:
        """[H] int64 expert index of each sub-head (a view)."""
        return self._owner[:self._n_rows]

    def index(self, expert_id: str) -> int:
        """The routing id of ``expert_id`` (its position in ``expert_ids``)."""
        try:
            return self.expert_ids.index(expert_id)
        except ValueError:
            raise UnknownExpertError(f"expert {expert_id!r} is not in the gate ({len(self)} experts); "
                                     "check the id (gate.expert_ids lists them)") from None

    def _grow(self, need: int) -> None:
        cap = self._W.shape[0]
        if need <= cap:
            return
        new = max(need, 2 * cap, 8)
        dev = self._W.device
        W, b, t = (torch.zeros(new, self.head_dim, device=dev), torch.zeros(new, device=dev),
                   torch.zeros(new, device=dev))
        o = torch.zeros(new, dtype=torch.long, device=dev)
        H = self._n_rows
        W[:H], b[:H], t[:H], o[:H] = self._W[:H], self._b[:H], self._thr[:H], self._owner[:H]
        self._W, self._b, self._thr, self._owner = W, b, t, o

    @staticmethod
    def _standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.double()
        mean = x.mean(0)
        std = x.std(0, unbiased=False)
        std = std.clamp_min(max(float(std.max()) * 1e-4, 1e-12))  # constant dims: no division by ~0
        return mean.float(), std.float()

    def fit_standardizer(self, features: torch.Tensor) -> None:
        """Set the gate-wide feature mean/std from ``features`` [N, D] (N >= 2), before the first expert.

        Without it, the first ``add_expert`` fits it on that request's queries. Frozen afterwards: every head is
        expressed in it. Raises ValueError once experts exist."""
        if self.expert_ids:
            raise ValueError(f"fit_standardizer: the gate already holds {len(self)} experts whose heads use the "
                             "current standardiser; set it before the first add_expert")
        full = check_features(features, self.feature_width, "features").detach().float().cpu()
        x = self._text(full)
        if len(x) < 2:
            raise ValueError(f"features: {len(x)} row; the standardiser needs at least 2")
        self.mean, self.std = (v.to(self._W.device) for v in self._standardizer(x))
        self.basis = self._basis(x)
        if self.image_dim:
            self._fit_image_standardizer(full[:, self.dim:][self._image_rows(full)])

    def phi(self, features: torch.Tensor) -> torch.Tensor:
        """The heads' input: ``z = (x - mean) / std``, and ``[z, z * z]`` for quadratic heads. [B, D] -> [B, F]."""
        mean, std = self.mean, self.std
        if mean.device != features.device:
            mean, std = mean.to(features.device), std.to(features.device)
        z = (features.float() - mean) / std
        return torch.cat([z, z * z], 1) if self.head == "quadratic" else z

    # ---------------------------------------------------------------------------------------------- learning
    def add_expert(self, expert_id: str, pos_feats: torch.Tensor, neg_feats: torch.Tensor,
                   pos_groups: Optional[Sequence] = None, names: Optional[Sequence[str]] = None,
                   neg_texts: Optional[Sequence[str]] = None, facts: Optional[Sequence[str]] = None,
                   neg_answers: Optional[Sequence[str]] = None, neg_keys: Optional[Sequence[str]] = None
                   ) -> HeadReport:
        """Fit and calibrate the head of a new expert; no other head changes.

        pos_feats: [P, D] the request's queries (P >= 1); neg_feats: [Q, D] retain queries and other requests'
        queries (Q >= 1). pos_groups: optional label per positive row (e.g. the entity of each query of a request
        that forgets several): one sub-head per group, each fitted on its group against all negatives, the expert
        firing where any of them fires (its score is their maximum); each sub-head is calibrated at
        ``target_fpr / groups``. A seeded ``calib_share`` of the negatives and of each group's positives is held out
        of the fit; thresholds are set on the held-out negatives (``calibrate_threshold``). Returns the expert's
        ``HeadReport`` (also in ``reports``). names: the names the request forgets, as text (its entities' names and
        aliases) for the name channel; neg_texts: the prompt texts of its negatives, on which the names are
        calibrated (module docstring); facts: the facts the request forgets (its forget records' answer keys) for
        the answer channel (``gate.policy``); neg_answers: the base's answers to its negatives, neg_keys: the
        negatives' own answers and keys: a fact one of them states is dropped (it does not tell the request's entity
        from the negatives'), a negative's longer fact that contains one is kept as its blocker
        (``RoutingPolicy._calibrate_facts``). Raises ValueError (bad id, duplicate id, wrong width, empty or non-finite
        features, groups not matching the positives, malformed names); the gate is unchanged.
        """
        t0 = time.perf_counter()
        validate_expert_id(expert_id)
        if expert_id in self.expert_ids:
            raise ValueError(f"expert {expert_id!r} is already in the gate; remove_expert it first to replace it "
                             "(heads are never retrained in place)")
        pos_full = check_features(pos_feats, self.feature_width, "pos_feats").detach().float().cpu()
        neg_full = check_features(neg_feats, self.feature_width, "neg_feats").detach().float().cpu()
        pos, neg = self._text(pos_full), self._text(neg_full)
        name_list = check_names(names)
        if neg_texts is not None and (isinstance(neg_texts, str) or not all(isinstance(t, str) for t in neg_texts)):
            raise ValueError("neg_texts: expected a list of the negatives' prompt texts (strings)")
        exact_only, neg_hits = self._calibrate_names(name_list, neg_texts or ())
        for what, v in (("neg_answers", neg_answers), ("neg_keys", neg_keys)):
            if v is not None and (isinstance(v, str) or not all(isinstance(t, str) for t in v)):
                raise ValueError(f"{what}: expected a list of the negatives' answers (strings)")
        fact_list, facts_dropped, blockers = self._calibrate_facts(check_names(facts, "facts"), neg_answers or (),
                                                                   neg_keys or ())
        if pos_groups is None:
            groups = [torch.arange(len(pos))]
        else:
            labels = list(pos_groups)
            if len(labels) != len(pos):
                raise ValueError(f"pos_groups: {len(labels)} labels for {len(pos)} positive rows; pass one label per "
                                 "row of pos_feats (or None for one head)")
            order = list(dict.fromkeys(labels))
            groups = [torch.tensor([i for i, x in enumerate(labels) if x == g]) for g in order]
        standardizer = img_standardizer = None
        if self.mean is None:
            standardizer = self._standardizer(torch.cat([pos, neg]))
            self.mean, self.std = (v.to(self._W.device) for v in standardizer)
            self.basis = self._basis(torch.cat([pos, neg]))
        if self.image_dim and self.img_mean is None:
            both = torch.cat([pos_full, neg_full])
            img_standardizer = self._fit_image_standardizer(both[:, self.dim:][self._image_rows(both)])
        try:
            p_pos, p_neg = self.phi(pos), self.phi(neg)
            gen = torch.Generator().manual_seed(stable_seed("gate-head", self.seed, expert_id))
            neg_fit, neg_cal = calibration_split(len(neg), self.calib_share, gen)
            cal_neg = p_neg[neg_cal] if len(neg_cal) else p_neg[neg_fit]
            target = self.target_fpr / len(groups)
            heads, subs, pos_fit_all, pos_cal_all = [], [], [], []
            for rows in groups:
                fit, cal = calibration_split(len(rows), self.calib_share, gen)
                pos_fit_all.append(rows[fit])
                pos_cal_all.append(rows[cal])
                w, c = fit_logistic(p_pos[rows[fit]], p_neg[neg_fit], self.l2, self.max_iter)
                cal_pos = p_pos[rows[cal]] if len(cal) else None
                t, neg_bound, pos_min = calibrate_threshold(cal_neg @ w + c,
                                                            cal_pos @ w + c if cal_pos is not None else None, target)
                heads.append((w, c, t))
                subs.append({"n_pos": len(rows), "threshold": t, "neg_bound": neg_bound, "pos_min": pos_min})
            protos, tau, sim = self._fit_bound(pos, pos_fit_all, pos_cal_all, expert_id)
            image = self._fit_image(pos_full, neg_full, groups)
        except BaseException:
            if standardizer is not None:
                self.mean = self.std = self.basis = None
            if img_standardizer:
                self.img_mean = self.img_std = self.img_basis = None
            raise

        def fires(x, raw=None):  # the expert fires where any sub-head reaches its threshold (and, with raw, the bound)
            if not len(x):
                return float("nan")
            f = torch.stack([x @ w + c >= t for w, c, t in heads]).any(0)
            if raw is not None and protos is not None:
                f &= sim(raw) >= tau
            return float(f.float().mean())

        pos_fit_rows, pos_cal_rows = torch.cat(pos_fit_all), torch.cat(pos_cal_all)
        report = HeadReport(expert_id=expert_id, n_pos=len(pos), n_neg=len(neg), n_pos_cal=len(pos_cal_rows),
                            n_neg_cal=len(neg_cal), threshold=subs[0]["threshold"], neg_bound=subs[0]["neg_bound"],
                            pos_min=subs[0]["pos_min"], fpr_cal=fires(cal_neg),
                            tpr_cal=fires(p_pos[pos_cal_rows]) if len(pos_cal_rows) else None,
                            fpr_fit=fires(p_neg[neg_fit]), tpr_fit=fires(p_pos[pos_fit_rows]),
                            target_fpr=self.target_fpr, seconds=round(time.perf_counter() - t0, 4),
                            n_heads=len(heads), sub_heads=subs, n_protos=0 if protos is None else len(protos),
                            sim_bound=None if protos is None else tau,
                            fpr_cal_bounded=fires(cal_neg, neg[neg_cal] if len(neg_cal) else neg[neg_fit]),
                            tpr_cal_bounded=fires(p_pos[pos_cal_rows], pos[pos_cal_rows]) if len(pos_cal_rows)
                            else None,
                            n_image_protos=sum(len(p) for p, _ in image[0]) if image else 0,
                            image_bounds=[round(t, 6) for _, t in image[0]] if image else [],
                            names=list(name_list), names_exact_only=list(exact_only), name_neg_hits=neg_hits,
                            n_neg_texts=len(neg_texts or ()), facts=list(fact_list),
                            facts_dropped=list(facts_dropped), fact_blockers=list(blockers),
                            n_neg_answers=len(neg_answers or ()))
        # commit (nothing above touched the heads)
        E, H = len(self.expert_ids), self._n_rows
        self._grow(H + len(heads))
        dev = self._W.device
        for j, (w, c, t) in enumerate(heads):
            self._W[H + j] = w.to(dev)
            self._b[H + j] = (c - t).to(dev)
            self._thr[H + j] = t
            self._owner[H + j] = E
        self._n_rows = H + len(heads)
        self._append_protos(protos, tau)
        self.expert_ids.append(expert_id)
        self._heads.append(len(heads))
        self._names.append(name_list)
        self._names_exact.append(exact_only)
        self._name_index = None
        self._facts.append(fact_list)
        self._facts_ambiguous.append(list(facts_dropped))
        self._fact_blockers.append(blockers)
        self._fact_index = None
        self._commit_image(image)
        self.reports[expert_id] = report
        return report

    def set_stacked(self, expert_ids: Sequence[str], weight: torch.Tensor, bias: torch.Tensor,
                    thresholds: Optional[torch.Tensor] = None, heads: Optional[Sequence[int]] = None,
                    protos: Optional[torch.Tensor] = None, proto_counts: Optional[Sequence[int]] = None,
                    sim_bounds: Optional[torch.Tensor] = None, names: Optional[Sequence] = None,
                    names_exact: Optional[Sequence] = None, facts: Optional[Sequence] = None,
                    fact_blockers: Optional[Sequence] = None, facts_ambiguous: Optional[Sequence] = None) -> None:
        """Install precomputed stacked heads, replacing all (loading, benchmarks): ``weight`` [H, F], ``bias`` [H]
        (calibrated), ``thresholds`` [H] (default 0), ``heads``: sub-heads per expert (default one each);
        similarity bounds: ``protos`` [sum(proto_counts), D] unit prototypes, ``proto_counts`` per expert (0: no
        bound), ``sim_bounds`` [E] (default: no bound for any expert); ``names``: per expert, its names as text
        (default none); ``names_exact``: per expert, those of its names matched exactly only (default none);
        ``facts`` / ``fact_blockers``: per expert, the facts of the answer channel and their blockers (default none).
        Needs the standardiser (``fit_standardizer``) first."""
        heads = [1] * len(expert_ids) if heads is None else [int(h) for h in heads]
        H = sum(heads)
        if self.mean is None:
            raise ValueError("set_stacked: the gate has no standardiser; call fit_standardizer first")
        if len(heads) != len(expert_ids) or min(heads, default=1) < 1:
            raise ValueError(f"heads: expected a count >= 1 for each of the {len(expert_ids)} experts, got {heads}")
        if tuple(weight.shape) != (H, self.head_dim) or tuple(bias.shape) != (H,):
            raise ValueError(f"weight {tuple(weight.shape)} / bias {tuple(bias.shape)}: expected [{H}, "
                             f"{self.head_dim}] / [{H}]")
        for eid in expert_ids:
            validate_expert_id(eid)
        if len(set(expert_ids)) != len(expert_ids):
            raise ValueError("expert_ids: duplicate ids")
        for what, v in (("names", names), ("names_exact", names_exact)):
            if v is not None and (isinstance(v, (str, bytes)) or len(v) != len(expert_ids)):
                raise ValueError(f"{what}: expected one list of names (strings) per expert ({len(expert_ids)}), got "
                                 f"{v!r:.80}")
        name_lists = [check_names(n, f"names[{e}]") for e, n in enumerate(names)] if names is not None else \
            [[] for _ in expert_ids]
        exact_lists = [check_names(n, f"names_exact[{e}]") for e, n in enumerate(names_exact)] \
            if names_exact is not None else [[] for _ in expert_ids]
        if facts is not None and (isinstance(facts, (str, bytes)) or len(facts) != len(expert_ids)):
            raise ValueError(f"facts: expected one list of facts (strings) per expert ({len(expert_ids)})")
        fact_lists = [check_names(f, f"facts[{e}]") for e, f in enumerate(facts)] if facts is not None else \
            [[] for _ in expert_ids]
        if fact_blockers is not None and (isinstance(fact_blockers, (str, bytes)) or
                                          len(fact_blockers) != len(expert_ids)):
            raise ValueError(f"fact_blockers: expected one list (strings) per expert ({len(expert_ids)})")
        blocker_lists = [check_names(b, f"fact_blockers[{e}]") for e, b in enumerate(fact_blockers)] \
            if fact_blockers is not None else [[] for _ in expert_ids]
        if facts_ambiguous is not None and (isinstance(facts_ambiguous, (str, bytes)) or
                                            len(facts_ambiguous) != len(expert_ids)):
            raise ValueError(f"facts_ambiguous: expected one list (strings) per expert ({len(expert_ids)})")
        ambiguous_lists = [check_names(b, f"facts_ambiguous[{e}]") for e, b in enumerate(facts_ambiguous)] \
            if facts_ambiguous is not None else [[] for _ in expert_ids]
        for e, (ns, xs) in enumerate(zip(name_lists, exact_lists)):
            if not {normalize_name(x) for x in xs} <= {normalize_name(n) for n in ns}:
                raise ValueError(f"names_exact[{e}] {xs}: must be among the expert's names {ns}")
        counts = [0] * len(expert_ids) if protos is None else [int(c) for c in (proto_counts or [])]
        if protos is not None:
            if len(counts) != len(expert_ids) or min(counts, default=0) < 0:
                raise ValueError(f"proto_counts: expected a count >= 0 for each of the {len(expert_ids)} experts")
            if tuple(protos.shape) != (sum(counts), self.bound_width):
                raise ValueError(f"protos {tuple(protos.shape)}: expected [{sum(counts)}, {self.bound_width}] "
                                 "(sum of proto_counts, the bound's width: bound_dim once a basis is set, else dim)")
            if sim_bounds is None or tuple(sim_bounds.shape) != (len(expert_ids),):
                raise ValueError(f"sim_bounds: expected [{len(expert_ids)}] with protos")
        self._n_rows, self._heads, self.expert_ids, self.reports = 0, [], [], {}
        self._grow(H)
        dev = self._W.device
        self._W[:H], self._b[:H] = weight.to(dev, torch.float32), bias.to(dev, torch.float32)
        self._thr[:H] = 0 if thresholds is None else thresholds.to(dev, torch.float32)
        self._owner[:H] = torch.repeat_interleave(torch.arange(len(heads), device=dev),
                                                  torch.tensor(heads, dtype=torch.long, device=dev))
        self._n_rows, self._heads, self.expert_ids = H, heads, list(expert_ids)
        self._names, self._names_exact, self._name_index = name_lists, exact_lists, None
        self._facts, self._fact_blockers, self._fact_index = fact_lists, blocker_lists, None
        self._facts_ambiguous = ambiguous_lists
        self._IP, self._igroups, self._img_cache = torch.zeros(0, self.image_width, device=dev), \
            [[] for _ in expert_ids], None
        self._P, self._pcount, self._tau, self._bound_cache = torch.zeros(0, self.bound_width, device=dev), [], [], None
        n = 0
        for e, c in enumerate(counts):
            self._append_protos(protos[n:n + c] if c else None,
                                float(sim_bounds[e]) if c and sim_bounds is not None else None)
            n += c

    def to(self, device) -> "Gate":
        """Move the stacked heads and the standardiser to ``device`` (e.g. the model's GPU) and return the gate;
        routing features on another device moves them on every call."""
        self._W, self._b, self._thr = self._W.to(device), self._b.to(device), self._thr.to(device)
        self._owner = self._owner.to(device)
        self._P, self._bound_cache = self._P.to(device), None
        if self.mean is not None:
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        if self.basis is not None:
            self.basis = self.basis.to(device)
        if self.img_mean is not None:
            self.img_mean, self.img_std = self.img_mean.to(device), self.img_std.to(device)
            if self.img_basis is not None:
                self.img_basis = self.img_basis.to(device)
        self._IP, self._BG, self._img_cache = self._IP.to(device), self._BG.to(device), None
        return self

    def remove_expert(self, expert_id: str) -> None:
        """Revoke: drop the head(s) of ``expert_id``; later experts move down by one routing id.
        Raises ``UnknownExpertError`` (a KeyError) for an id the gate does not hold."""
        e = self.index(expert_id)
        start, n, H = sum(self._heads[:e]), self._heads[e], self._n_rows
        for buf in (self._W, self._b, self._thr, self._owner):
            buf[start:H - n] = buf[start + n:H].clone()
            buf[H - n:H] = 0
        self._owner[start:H - n] -= (self._owner[start:H - n] > e).long()
        self._n_rows = H - n
        p0, pc, pn = sum(self._pcount[:e]), self._pcount[e], sum(self._pcount)
        if pc:
            self._P[p0:pn - pc] = self._P[p0 + pc:pn].clone()
            self._P[pn - pc:pn] = 0
        del self._pcount[e]
        del self._tau[e]
        self._bound_cache = None
        del self.expert_ids[e]
        del self._heads[e]
        del self._names[e]
        del self._names_exact[e]
        self._name_index = None
        del self._facts[e]
        del self._fact_blockers[e]
        del self._facts_ambiguous[e]
        self._fact_index = None
        if self._igroups:
            i0 = sum(c for g in self._igroups[:e] for c, _ in g)
            ic = sum(c for c, _ in self._igroups[e])
            self._IP = torch.cat([self._IP[:i0], self._IP[i0 + ic:]]).contiguous()
            del self._igroups[e]
            self._img_cache = None
        self.reports.pop(expert_id, None)

    # ---------------------------------------------------------------------------------------------- inference
    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
             input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gate features from the hidden states of decoder layer ``layer``: ``features.pool`` with this gate's
        pooling, then (image channel) ``features.image_pool`` over the positions where ``input_ids`` is
        ``image_token_id``. hidden: [B, S, H], attention_mask / input_ids: [B, S] -> [B, D (+ D_img)] fp32."""
        x = _features.pool(hidden, attention_mask, self.pooling)
        if not self.image_dim:
            return x
        if input_ids is None or self.image_token_id is None:
            raise ValueError("this gate has an image channel: pool needs input_ids (and the gate an image_token_id) "
                             "to find the image positions")
        return torch.cat([x, _features.image_pool(hidden, attention_mask, input_ids, self.image_token_id)], 1)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Calibrated logits: ``phi(z) @ W^T + b`` (the maximum over an expert's sub-heads); expert e's head fires for
        query b where ``scores[b, e] >= 0`` (routing also needs ``similarity_to(x)[b, e] >= sim_bounds[e]``).

        features: [B, D] float       returns [B, E] fp32 (on the features' device)
        """
        x = self._text(check_features(features, self.feature_width, "features", allow_empty=True, finite=False))
        if not self.expert_ids:
            return torch.zeros(x.shape[0], 0, dtype=torch.float32, device=x.device)
        W, b = self.weight, self.bias
        if W.device != x.device:
            W, b = W.to(x.device), b.to(x.device)
        s = torch.addmm(b, self.phi(x), W.t())  # [B, H]
        E = len(self.expert_ids)
        if self._n_rows == E:  # one head per expert: rows are experts
            return s
        owner = self.owner.to(x.device).expand(s.shape[0], -1)
        out = torch.full((s.shape[0], E), float("-inf"), dtype=s.dtype, device=s.device)
        return out.scatter_reduce_(1, owner, s, reduce="amax")  # an expert's score: its best sub-head

    # ------------------------------------------------------------------------------------------------ storage
    def config(self) -> dict:
        return {"layer": self.layer, "dim": self.dim, "pooling": self.pooling, "head": self.head,
                "target_fpr": self.target_fpr, "calib_share": self.calib_share, "l2": self.l2, "seed": self.seed,
                "max_iter": self.max_iter, "similarity": self.similarity, "n_protos": self.n_protos,
                "sim_quantile": self.sim_quantile, "bound_dim": self.bound_dim, "image_dim": self.image_dim,
                "image_token_id": self.image_token_id, "image_bound_dim": self.image_bound_dim,
                "n_image_protos": self.n_image_protos, "image_floor": self.image_floor,
                "image_similarity": self.image_similarity, "image_candidates": self.image_candidates,
                "text_by_name": self.text_by_name, "image_slack": self.image_slack,
                "name_fuzzy_chars": self.name_fuzzy_chars, "name_max_edits": self.name_max_edits,
                "recognition": self.recognition}

    def save(self, path) -> Path:
        """Write the gate into folder ``path`` (``gate.storage.save_gate``); returns the folder."""
        return save_gate(self, path)

    @classmethod
    def load(cls, path, names: Optional[Mapping[str, Sequence[str]]] = None) -> "Gate":
        """A gate saved by ``save`` (``gate.storage.load_gate``: format, sha256 and shapes checked; older versions
        load or raise ``GateFormatError`` saying what to do; ``names`` converts a v3 file's token-id names)."""
        return load_gate(cls, path, names)

    def __repr__(self) -> str:
        return (f"Gate(layer={self.layer}, dim={self.dim}, pooling={self.pooling!r}, head={self.head!r}, "
                f"experts={len(self)}, target_fpr={self.target_fpr}, similarity={self.similarity})")
