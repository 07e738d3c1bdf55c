"""The gate: one small learned head per expert over the base model's own pooled hidden state, calibrated alone.

Local and lifelong: each request adds one head, trained on that request's queries (positives) against retain queries
and other requests' queries (negatives); old heads are never retrained, and revoking a request removes its head.

Features ``x`` (``features.pool`` of decoder layer ``layer``) are first standardised with one gate-wide mean/std
(``fit_standardizer``, else fitted on the first request's queries and then frozen): ``z = (x - mean) / std``.
A head is a logistic regression on ``phi(z)``: ``z`` (``head="linear"``) or ``[z, z * z]`` (``head="quadratic"``: a
diagonal quadratic discriminant, whose firing region can be bounded - an ellipsoid around the request's queries - so
that queries unlike anything the head saw stay out), with class-balanced weighted BCE + L2 on per-head standardised
inputs, full-batch L-BFGS; the per-head standardisation is folded back into one row of a stacked linear layer. Its
threshold is calibrated on a held-out share of the negatives: the lowest logit at which at most ``target_fpr`` of
those negatives fire; when the held-out positives all score above that bound, the threshold moves to the middle of
the gap (margin for unseen queries). The threshold is folded into the bias as well, so

    scores(x) = phi(z) @ W^T + b       calibrated logits: expert e fires where scores[:, e] >= 0

and routing is ``ops.topk_routing(scores, k, scoring="sigmoid", threshold=0.5)``: sigmoid >= 0.5 <=> logit >= 0.
Routing ids index ``expert_ids`` (the order of addition; a removal moves later experts down by one, as in the bank).
A request that forgets several entities may get one sub-head per entity (``pos_groups``): its score is the maximum of
its sub-heads', computed from the same stacked matmul.

Similarity bound (``similarity``, on by default): a head separates its request from the queries it was shown, but a
query about an entity it never saw can land on its positive side (on the taught embedded default: 70-90% of the
queries about entities the gate never saw fired some head without it, with plain negatives). So each expert also
keeps up to ``n_protos`` prototypes per positive group (the fitted positives that cover them best:
``cover_prototypes``; unit vectors of ``z`` projected on its top ``bound_dim`` principal directions, a basis frozen
with the standardiser), and a chosen expert is kept only if the query's cosine similarity to its nearest prototype
reaches the expert's bound ``tau_e = min(similarity, the sim_quantile quantile of its held-out positives'
similarities)`` (an expert whose queries are spread out gets a looser bound). ``route`` checks the bound only for the
top-k experts the heads chose (a gather of k * P_max prototypes per query: the cost does not grow with E); a vetoed
choice becomes -1 (the next expert is not tried). Adding an expert appends its prototypes; revoking removes them.

Image channel (``image_dim > 0``): features may carry, after the D pooled columns, ``image_dim`` columns of the
query's image (``features.image_pool``: [mean, max] of layer L over the image positions, zeros for a query without
an image). Image positions precede the question in the prompt, so these columns do not move when a question is
reworded; heads and the similarity bound, which read the D pooled columns, do (measured on the taught embedded
default: the held-out phrasing family's image queries reached the right expert 0.53 of the time through the heads
and bound). With the image channel, a query *with* an image is routed by its image alone: nearest-neighbour over
every expert's image prototypes (the distinct images of its positives, per positive group) and a gate-wide
background (the distinct images of the negatives it was shown that belong to no expert); the query goes to the
owner of the nearest prototype if that is an expert's and the cosine reaches the group's bound ``tau_g`` = the
lowest similarity of one of the group's images to its nearest other image (leave one out), its distance to 1
stretched by ``image_slack`` (``1 - slack * (1 - lowest)``; at least ``image_floor``; ``image_similarity`` for a
group of one image). ``image_slack`` trades fresh pictures of a forgotten entity against look-alikes (taught
embedded default, per_task / per_entity, fresh-picture recall and never-requested false positives: slack 1 (the
default) 0.875 / 0.9 and 0 / 0; 1.5: 0.975 / 0.95 and 0.016 / 0; 2: 0.975 / 0.975 and 0.049 / 0; 3: 1.0 / 1.0 and
0.13 / 0.016). Everything in standardised, unit, projected
(``image_bound_dim`` principal directions, at most one fewer than the distinct images it is fitted on) image space,
fitted once like the feature standardiser. Queries without an image keep the heads (and the bound). Revoking an
expert removes its image prototypes.

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

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from lumoe_engine import ops
from lumoe_engine.gate import features as _features
from lumoe_engine.gate.config import HEADS
from lumoe_engine.gate.names import NameIndex, normalize_name
from lumoe_engine.fileio import atomic_write, validate_expert_id
from lumoe_engine.model.bank import UnknownExpertError
from lumoe_engine.seeding import stable_seed

GATE_FORMAT = "lumoe-gate"
GATE_FORMAT_VERSION = 5  # 5: the recognition channel's flag; 4: names as text; 3: names as token ids (refused unless names are given: GateFormatError);
#                            2: prototypes + similarity bounds; versions 1-2 load without them (and without names)
GATE_JSON = "gate.json"


@dataclass
class HeadReport:
    """How one head was fitted and calibrated.

    threshold: the threshold of the uncalibrated logit, folded into the bias; fpr_cal / tpr_cal: the share of the
    held-out calibration negatives / positives that fire at it (tpr_cal None without held-out positives);
    fpr_fit / tpr_fit: the same on the rows the head was fitted on; neg_bound: the lowest threshold meeting
    ``target_fpr`` on the calibration negatives; pos_min: the lowest calibration positive logit (None without).
    threshold, neg_bound and
    pos_min are those of the first sub-head; ``sub_heads`` lists every sub-head's (one per positive group); the rates
    are the expert's (any sub-head firing). n_protos / sim_bound: the similarity bound (module docstring);
    fpr_cal_bounded / tpr_cal_bounded: the calibration rates when the bound must hold too.
    """

    expert_id: str
    n_pos: int
    n_neg: int
    n_pos_cal: int
    n_neg_cal: int
    threshold: float
    neg_bound: float
    pos_min: Optional[float]
    fpr_cal: float
    tpr_cal: Optional[float]
    fpr_fit: float
    tpr_fit: float
    target_fpr: float
    seconds: float
    n_heads: int = 1
    sub_heads: list = field(default_factory=list)
    n_protos: int = 0                     # prototypes kept for the similarity bound (0: no bound)
    sim_bound: Optional[float] = None     # tau_e: the cosine bound of the expert (None: no bound)
    fpr_cal_bounded: Optional[float] = None  # fpr_cal / tpr_cal with the similarity bound applied as well
    tpr_cal_bounded: Optional[float] = None
    n_image_protos: int = 0               # image channel: prototypes of the expert, bound of each positive group
    image_bounds: list = field(default_factory=list)
    names: list = field(default_factory=list)             # name channel: the expert's names (text)
    names_exact_only: list = field(default_factory=list)  # names whose typo match fired on a negative text
    name_neg_hits: int = 0                # negative texts that name the expert exactly (they route to it)
    n_neg_texts: int = 0                  # negative texts the names were checked on


def _check_features(x, dim: int, name: str, allow_empty: bool = False, finite: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor [n, {dim}], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name}: expected shape [n, {dim}] (the gate's feature width dim={dim}), got "
                         f"{tuple(x.shape)}; compute features with the gate's layer and pooling")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating tensor, got {x.dtype}; cast with .float()")
    if not allow_empty and x.shape[0] == 0:
        raise ValueError(f"{name}: empty ([0, {dim}]); pass at least one row")
    if finite and x.numel() and not bool(torch.isfinite(x).all()):  # a device sync: not on the routing path
        raise ValueError(f"{name}: contains NaN or inf; check the feature extraction")
    return x


def _split(n: int, share: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of range(n): (fit rows, calibration rows); calibration gets floor(n * share), fit keeps >= 1."""
    perm = torch.randperm(n, generator=gen)
    n_cal = min(int(math.floor(n * share)), n - 1) if n > 1 else 0
    return perm[n_cal:], perm[:n_cal]


def fit_logistic(pos: torch.Tensor, neg: torch.Tensor, l2: float = 1e-2, max_iter: int = 100
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced L2-regularised logistic regression, positives vs negatives, on the given inputs.

    Features are standardised (mean and std of all rows) for the fit; the result is folded back:
    ``logit(x) = x . w + c``. Loss: 0.5 mean BCE(pos) + 0.5 mean BCE(neg) + 0.5 * l2 * |w_std|^2, minimised by
    L-BFGS (analytic gradient, Armijo backtracking, fp64; ``torch.optim`` is avoided: its first step imports
    torch._dynamo, ~9 s). Deterministic for given inputs.
    pos: [P, D], neg: [Q, D] fp32        returns w: [D] fp32, c: [] fp32
    """
    x = torch.cat([pos, neg]).double()
    mu = x.mean(0)
    sd = x.std(0, unbiased=False).clamp_min(1e-6 * float(x.abs().max().clamp_min(1e-30)))
    z = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=torch.float64)], 1)  # [N, D + 1], last = bias
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    wt = torch.cat([torch.full((len(pos),), 0.5 / len(pos)), torch.full((len(neg),), 0.5 / len(neg))]).double()
    reg = torch.full((z.shape[1],), float(l2), dtype=torch.float64)
    reg[-1] = 0.0  # the bias is not regularised

    def f_g(theta):
        logit = z @ theta
        loss = (wt * (torch.nn.functional.softplus(logit) - y * logit)).sum() + 0.5 * (reg * theta * theta).sum()
        grad = z.t() @ (wt * (torch.sigmoid(logit) - y)) + reg * theta
        return float(loss), grad

    theta = torch.zeros(z.shape[1], dtype=torch.float64)
    f, g = f_g(theta)
    hist_s, hist_y = [], []
    for it in range(max_iter):
        if float(g.abs().max()) < 1e-7:
            break
        # two-loop recursion: d = -H g
        q = g.clone()
        alphas = []
        for s_, y_ in reversed(list(zip(hist_s, hist_y))):
            a = float(s_ @ q) / float(y_ @ s_)
            alphas.append(a)
            q -= a * y_
        if hist_s:
            q *= float(hist_s[-1] @ hist_y[-1]) / float(hist_y[-1] @ hist_y[-1])
        else:
            q /= max(float(g.norm()), 1e-12)
        for (s_, y_), a in zip(zip(hist_s, hist_y), reversed(alphas)):
            b = float(y_ @ q) / float(y_ @ s_)
            q += (a - b) * s_
        d = -q
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: restart from the gradient
            hist_s, hist_y = [], []
            d, slope = -g / max(float(g.norm()), 1e-12), -float(g.norm())
        step = 1.0
        for _ in range(40):
            f_new, g_new = f_g(theta + step * d)
            if f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break
        s_vec, y_vec = step * d, g_new - g
        theta = theta + s_vec
        if float(s_vec @ y_vec) > 1e-12:
            hist_s.append(s_vec)
            hist_y.append(y_vec)
            if len(hist_s) > 10:
                hist_s.pop(0)
                hist_y.pop(0)
        done = abs(f - f_new) <= 1e-12 * max(1.0, abs(f))
        f, g = f_new, g_new
        if done:
            break
    w_raw = theta[:-1] / sd
    c_raw = theta[-1] - (w_raw * mu).sum()
    return w_raw.float(), c_raw.float()


def calibrate_threshold(neg_logits: torch.Tensor, pos_logits: Optional[torch.Tensor], target_fpr: float) -> tuple:
    """The logit threshold t (an expert fires where logit >= t) for one head.

    neg_bound: the lowest t at which at most ``floor(target_fpr * Q)`` of ``neg_logits`` reach t (just above the
    next negative); when every positive lies above it, t is the middle of the gap (min positive + neg_bound) / 2,
    else t = neg_bound (false positives come first: recall is what the head's fit gives).
    neg_logits: [Q] (Q >= 1), pos_logits: [P] or None       returns (t, neg_bound, pos_min or None)
    """
    q = neg_logits.double().sort(descending=True).values
    allowed = int(math.floor(target_fpr * len(q) + 1e-9))
    if allowed >= len(q):
        neg_bound = -math.inf
    else:
        neg_bound = math.nextafter(float(q[allowed]), math.inf)
    pos_min = float(pos_logits.min()) if pos_logits is not None and len(pos_logits) else None
    if pos_min is not None and pos_min > neg_bound:
        t = 0.5 * (pos_min + neg_bound) if math.isfinite(neg_bound) else pos_min - 1.0
    else:
        t = neg_bound if math.isfinite(neg_bound) else 0.0
    # the fp32 logit must still compare right after folding: keep t strictly above the allowed negatives in fp32
    t32 = float(torch.tensor(t, dtype=torch.float32))
    if math.isfinite(neg_bound) and t32 < neg_bound:
        t32 = float(torch.nextafter(torch.tensor(t32), torch.tensor(math.inf)))
    return t32, neg_bound, pos_min


def cover_prototypes(x: torch.Tensor, k: int) -> torch.Tensor:
    """Up to ``k`` rows of the unit rows ``x`` chosen to cover them all (greedy farthest-first / k-center in cosine:
    start from the row most similar to the mean direction, then repeatedly add the row least similar to every row
    chosen so far), so that the worst-covered row is as close to a prototype as the greedy rule gets; all rows when
    ``len(x) <= k``. Deterministic. x: [P, D] unit rows -> [min(k, P), D]."""
    if len(x) <= k:
        return x.clone()
    first = int((x @ torch.nn.functional.normalize(x.mean(0), dim=0)).argmax())
    chosen = [first]
    best = x @ x[first]                       # [P] similarity of each row to its nearest chosen row
    for _ in range(k - 1):
        j = int(best.argmin())
        chosen.append(j)
        best = torch.maximum(best, x @ x[j])
    return x[chosen].clone()


def principal_directions(z: torch.Tensor, k: int) -> torch.Tensor:
    """The top ``k`` principal directions of the rows of ``z`` [N, D] (centred here), strongest first: [D, k] fp32.

    With fewer rows than columns (a real model's first request: tens of queries, D = 2 x 4096 pooled columns) they
    come from the N x N Gram matrix (``v_i = z^T u_i / sqrt(lambda_i)``, O(N^2 D)), else from the D x D scatter
    matrix (O(D^3)); the same directions up to their sign and the last bits. The Gram form falls back to the scatter
    matrix when one of the k directions carries (almost) no variance. fp64 inside."""
    z = z.double()
    z = z - z.mean(0)
    n, d = z.shape
    if 2 * n <= d:
        lam, u = torch.linalg.eigh(z @ z.t())                    # ascending
        lam, u = lam[-k:].flip(0), u[:, -k:].flip(1)
        if len(lam) == k and float(lam[-1]) > 1e-9 * max(float(lam[0]), 1e-300):
            return (z.t() @ u / lam.sqrt()).float().contiguous()
    _, vecs = torch.linalg.eigh(z.t() @ z)
    return vecs[:, -k:].flip(1).float().contiguous()


class GateFormatError(ValueError):
    """A gate file this version cannot read as it is (e.g. a v3 file whose name channel holds token ids)."""


def check_names(names, what: str = "names") -> list[str]:
    """``names`` (an expert's names as text: its entities' names and aliases) as a list of stripped strings,
    repeats (after ``names.normalize_name``) dropped in order; ValueError naming the bad entry otherwise."""
    if names is None:
        return []
    if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
        raise ValueError(f"{what}: expected a list of names (strings), got {type(names).__name__}; pass e.g. "
                         f"[\"Vorla Quintessa\", \"The Glass Widow\"]")
    out: list[str] = []
    seen: set = set()
    for j, n in enumerate(names):
        if not isinstance(n, str):
            raise ValueError(f"{what}[{j}]: expected a name (a string), got {type(n).__name__} {n!r:.40}")
        words = normalize_name(n)
        if not words:
            raise ValueError(f"{what}[{j}]: name {n!r} has no letter or digit; give the name as people write it")
        if words not in seen:
            seen.add(words)
            out.append(n.strip())
    return out


class Gate:
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
        full = _check_features(features, self.feature_width, "features").detach().float().cpu()
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
                   neg_texts: Optional[Sequence[str]] = None) -> HeadReport:
        """Fit and calibrate the head of a new expert; no other head changes.

        pos_feats: [P, D] the request's queries (P >= 1); neg_feats: [Q, D] retain queries and other requests'
        queries (Q >= 1). pos_groups: optional label per positive row (e.g. the entity of each query of a request
        that forgets several): one sub-head per group, each fitted on its group against all negatives, the expert
        firing where any of them fires (its score is their maximum); each sub-head is calibrated at
        ``target_fpr / groups``. A seeded ``calib_share`` of the negatives and of each group's positives is held out
        of the fit; thresholds are set on the held-out negatives (``calibrate_threshold``). Returns the expert's
        ``HeadReport`` (also in ``reports``). names: the names the request forgets, as text (its entities' names and
        aliases) for the name channel; neg_texts: the prompt texts of its negatives, on which the names are
        calibrated (module docstring). Raises ValueError (bad id, duplicate id, wrong width, empty or non-finite
        features, groups not matching the positives, malformed names); the gate is unchanged.
        """
        t0 = time.perf_counter()
        validate_expert_id(expert_id)
        if expert_id in self.expert_ids:
            raise ValueError(f"expert {expert_id!r} is already in the gate; remove_expert it first to replace it "
                             "(heads are never retrained in place)")
        pos_full = _check_features(pos_feats, self.feature_width, "pos_feats").detach().float().cpu()
        neg_full = _check_features(neg_feats, self.feature_width, "neg_feats").detach().float().cpu()
        pos, neg = self._text(pos_full), self._text(neg_full)
        name_list = check_names(names)
        if neg_texts is not None and (isinstance(neg_texts, str) or not all(isinstance(t, str) for t in neg_texts)):
            raise ValueError("neg_texts: expected a list of the negatives' prompt texts (strings)")
        exact_only, neg_hits = self._calibrate_names(name_list, neg_texts or ())
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
            neg_fit, neg_cal = _split(len(neg), self.calib_share, gen)
            cal_neg = p_neg[neg_cal] if len(neg_cal) else p_neg[neg_fit]
            target = self.target_fpr / len(groups)
            heads, subs, pos_fit_all, pos_cal_all = [], [], [], []
            for rows in groups:
                fit, cal = _split(len(rows), self.calib_share, gen)
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
                            n_neg_texts=len(neg_texts or ()))
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
        self._commit_image(image)
        self.reports[expert_id] = report
        return report

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

    # ------------------------------------------------------------------------------------------ similarity bound
    def _basis(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The top ``bound_dim`` principal directions of the standardised ``x`` [N, D] (None: no projection, when
        bound_dim is None or >= min(N, D)), frozen with the standardiser."""
        if self.bound_dim is None or self.bound_dim >= min(x.shape[0], self.dim):
            return None
        z = (x.double().cpu() - self.mean.double().cpu()) / self.std.double().cpu()
        return principal_directions(z, self.bound_dim).to(self._W.device)

    @property
    def bound_width(self) -> int:
        """D_b: the width of the similarity bound's space (``bound_dim`` once a basis is set, else D)."""
        return self.dim if self.basis is None else self.basis.shape[1]

    def _unit_z(self, x: torch.Tensor) -> torch.Tensor:
        """Unit rows of the standardised features ``z`` (projected on ``basis`` when set): [B, D] -> [B, D_b]."""
        mean, std = self.mean, self.std
        if mean.device != x.device:
            mean, std = mean.to(x.device), std.to(x.device)
        z = (x.float() - mean) / std
        if self.basis is not None:
            z = z @ (self.basis if self.basis.device == x.device else self.basis.to(x.device))
        return torch.nn.functional.normalize(z, dim=1)

    def _fit_bound(self, pos: torch.Tensor, fit_rows: list, cal_rows: list, expert_id: str):
        """Prototypes (``cover_prototypes`` of each group's fitted positives) and the cosine bound of a new expert:
        (protos [P, D] or None, tau, sim(x) -> [n] nearest-prototype cosine). tau = min(similarity, the
        ``sim_quantile`` quantile of the held-out positives' similarities); without held-out positives (or with
        sim_quantile None), tau = similarity."""
        if self.similarity is None:
            return None, None, None
        u = self._unit_z(pos)
        protos = torch.cat([cover_prototypes(u[rows], self.n_protos) for rows in fit_rows])

        def sim(x):
            return (self._unit_z(x) @ protos.t()).amax(1)

        cal = torch.cat(cal_rows)
        tau = self.similarity
        if len(cal) and self.sim_quantile is not None:
            tau = min(tau, float(torch.quantile(sim(pos[cal]).double(), self.sim_quantile)))
        return protos, float(tau), sim

    def _append_protos(self, protos: Optional[torch.Tensor], tau: Optional[float]) -> None:
        n0 = sum(self._pcount)
        n = 0 if protos is None else len(protos)
        if n0 + n > self._P.shape[0] or self._P.shape[1] != self.bound_width:
            P = torch.zeros(max(n0 + n, 2 * self._P.shape[0], 64), self.bound_width, device=self._P.device)
            if n0:
                P[:n0] = self._P[:n0]
            self._P = P
        if n:
            self._P[n0:n0 + n] = protos.to(self._P.device, torch.float32)
        self._pcount.append(n)
        self._tau.append(-2.0 if tau is None else float(tau))
        self._bound_cache = None

    def _bounds(self, device):
        """(start [E], count [E], tau [E], P_max) of the prototypes, cached until the experts change."""
        c = self._bound_cache
        if c is None or c[0].device != torch.device(device):
            counts = torch.tensor(self._pcount, dtype=torch.long)
            start = torch.cumsum(counts, 0) - counts
            c = (start.to(device), counts.to(device), torch.tensor(self._tau, dtype=torch.float32).to(device),
                 max(self._pcount, default=0))
            self._bound_cache = c
        return c

    # ------------------------------------------------------------------------------------------- image channel
    _SAME = 1.0 - 1e-4  # cosine at which two image rows are the same picture (features differ in the last bits)

    def _fit_image_standardizer(self, x: torch.Tensor) -> bool:
        """Fit the image standardiser (and projection) on image rows ``x`` [n, D_img]; False when n < 2 (left
        unset: a later request with images fits it)."""
        if len(x) < 2:
            return False
        x = self._dedupe_raw(x)
        if len(x) < 2:
            return False
        mean, std = self._standardizer(x)
        self.img_mean, self.img_std = mean.to(self._W.device), std.to(self._W.device)
        basis = None
        k = None if self.image_bound_dim is None else min(self.image_bound_dim, len(x) - 1)
        if k is not None and k < self.image_dim:  # (at most n - 1 directions carry the n images' spread)
            z = (x.double() - mean.double()) / std.double()
            basis = principal_directions(z, k).to(self._W.device)
        self.img_basis = basis
        return True

    @property
    def image_width(self) -> int:
        """D_bi: width of the image channel's space (the projection's, else D_img)."""
        return self.image_dim if self.img_basis is None else self.img_basis.shape[1]

    def _img_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Unit rows of the standardised (projected) image columns: [n, D_img] -> [n, D_bi]."""
        dev = x.device
        z = (x.float() - self.img_mean.to(dev)) / self.img_std.to(dev)
        if self.img_basis is not None:
            z = z @ self.img_basis.to(dev)
        return torch.nn.functional.normalize(z, dim=1)

    @staticmethod
    def _distinct(u: torch.Tensor, others: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Indices of the rows of unit ``u`` that are distinct pictures (cosine < 1 - 1e-4 to every earlier kept row
        and to every row of ``others``), in order."""
        n = len(u)
        if not n:
            return torch.zeros(0, dtype=torch.long)
        free = [True] * n
        if others is not None and len(others):
            free = ((u @ others.to(u.device).t()).amax(1) < Gate._SAME).tolist()
        # greedy in order: a kept row covers every row that is the same picture (one matrix-vector product per kept
        # row, no n x n matrix, no re-gathering of the kept rows per candidate)
        covered = torch.zeros(n, dtype=torch.bool, device=u.device)
        keep: list[int] = []
        for i in range(n):
            if free[i] and not bool(covered[i]):
                keep.append(i)
                covered |= (u @ u[i]) >= Gate._SAME
        return torch.tensor(keep, dtype=torch.long)

    def _dedupe_raw(self, x: torch.Tensor) -> torch.Tensor:
        return x[self._distinct(torch.nn.functional.normalize(x.float(), dim=1))] if len(x) else x

    def _fit_image(self, pos_full: torch.Tensor, neg_full: torch.Tensor, groups: list):
        """The image channel of a new expert: ([(prototypes [p, D_bi], tau)] per positive group, background rows to
        add [m, D_bi], background rows to drop [bool]) or None (no image channel / no standardiser / no image
        positives)."""
        if not self.image_dim or self.img_mean is None:
            return None
        has = self._image_rows(pos_full)
        out = []
        pos_units = []
        for rows in groups:
            r = rows[has[rows]]
            if not len(r):
                continue
            u = self._img_unit(pos_full[r, self.dim:])
            u = u[self._distinct(u)]
            u = cover_prototypes(u, self.n_image_protos)
            if len(u) > 1:
                S = u @ u.t()
                S.fill_diagonal_(-2.0)
                tau = max(self.image_floor, 1.0 - self.image_slack * (1.0 - float(S.amax(1).min())))
            else:
                tau = self.image_similarity
            out.append((u.contiguous(), float(tau)))
            pos_units.append(u)
        if not out:
            return None
        mine = torch.cat(pos_units)
        n_h = self._image_rows(neg_full)
        experts = self._IP[:self._n_image].cpu() if self._n_image else None  # (fitted on the CPU, kept on device)
        bg = self._BG.cpu()
        known = torch.cat([t for t in (mine, experts, bg if len(bg) else None) if t is not None])
        bg_new = torch.zeros(0, self.image_width)
        if bool(n_h.any()):
            v = self._img_unit(neg_full[n_h, self.dim:])
            bg_new = v[self._distinct(v, known)]
        drop = (bg @ mine.t()).amax(1) >= self._SAME if len(bg) else torch.zeros(0, dtype=torch.bool)
        return out, bg_new, drop

    @property
    def _n_image(self) -> int:
        return sum(p for g in self._igroups for p, _ in g)

    def _commit_image(self, image) -> None:
        """Append a new expert's image prototypes (``_fit_image``'s result; None: none) and update the background."""
        if image is None:
            self._igroups.append([])
            self._img_cache = None
            return
        groups, bg_new, drop = image
        n = self._n_image
        new = [u.to(self._IP.device) for u, _ in groups]
        self._IP = torch.cat(([self._IP[:n]] if n else []) + new).contiguous()
        self._igroups.append([(len(u), t) for u, t in groups])
        keep = self._BG[~drop.to(self._BG.device)] if len(self._BG) else \
            torch.zeros(0, self.image_width, device=self._IP.device)
        self._BG = torch.cat([keep.to(torch.float32), bg_new.to(keep.device)]).contiguous()
        self._img_cache = None

    EXACT_IMAGE_PROTOS = 4096  # up to this many image prototypes the nearest one is found by brute force

    def _image_index(self, device) -> dict:
        """The image channel's routing tables, cached until the experts change: every prototype with its owner
        expert (-1: background) and its group's bound, and per positive group its unit centroid, first row and count
        (for the two-stage search above ``EXACT_IMAGE_PROTOS``)."""
        c = self._img_cache
        if c is None or c["P"].device != torch.device(device):
            owner, tau, g_start, g_count = [], [], [], []
            n = 0
            for e, groups in enumerate(self._igroups):
                for p, t in groups:
                    owner += [e] * p
                    tau += [t] * p
                    g_start.append(n)
                    g_count.append(p)
                    n += p
            nb = len(self._BG)
            IP = self._IP[:n].to(device)
            P = torch.cat([IP, self._BG.to(device)]) if nb else IP
            start = torch.tensor(g_start, dtype=torch.long, device=device)
            count = torch.tensor(g_count, dtype=torch.long, device=device)
            grp = torch.repeat_interleave(torch.arange(len(g_count), device=device), count)
            cent = torch.zeros(len(g_count), IP.shape[1], device=device).index_add_(0, grp, IP)
            c = {"P": P, "owner": torch.tensor(owner + [-1] * nb, dtype=torch.long, device=device),
                 "tau": torch.tensor(tau + [2.0] * nb, dtype=torch.float32, device=device), "n": n,
                 "BG": self._BG.to(device), "IP": IP, "centroids": torch.nn.functional.normalize(cent, dim=1),
                 "g_start": start, "g_count": count, "p_max": max(g_count, default=0)}
            self._img_cache = c
        return c

    def _nearest_image(self, u: torch.Tensor, c: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(best cosine [B], its owner [B] (-1: background), its bound [B]) of unit image rows ``u`` [B, D_bi]:
        brute force up to ``EXACT_IMAGE_PROTOS`` prototypes; above, the ``image_candidates`` positive groups with
        the nearest centroids, then their prototypes (and the whole background)."""
        if c["n"] <= self.EXACT_IMAGE_PROTOS:
            best, j = (u @ c["P"].t()).max(1)
            return best, c["owner"][j], c["tau"][j]
        m = min(self.image_candidates, len(c["g_count"]))
        g = (u @ c["centroids"].t()).topk(m, dim=1).indices                  # [B, m] candidate groups
        k = torch.arange(c["p_max"], device=u.device)
        valid = k < c["g_count"][g].unsqueeze(-1)                             # [B, m, P_max]
        idx = torch.where(valid, c["g_start"][g].unsqueeze(-1) + k, c["g_start"][g].unsqueeze(-1))
        G = c["IP"].index_select(0, idx.reshape(-1)).view(*idx.shape, -1)    # [B, m, P_max, D_bi]
        # a broadcast multiply-sum: bmm with one column is several times slower on CPU
        sims = (G * u[:, None, None, :]).sum(-1).masked_fill(~valid, float("-inf")).flatten(1)
        best, j = sims.max(1)
        row = idx.flatten(1).gather(1, j.unsqueeze(1)).squeeze(1)
        owner, tau = c["owner"][row], c["tau"][row]
        if len(c["BG"]):
            bg = (u @ c["BG"].t()).amax(1)
            lose = bg >= best
            best = torch.where(lose, bg, best)
            owner = torch.where(lose, torch.full_like(owner, -1), owner)
        return best, owner, tau

    def route_images(self, features: torch.Tensor) -> torch.Tensor:
        """The image channel's decision for each row (``features`` [B, D + D_img]): the expert owning the nearest
        image prototype when the cosine reaches its group's bound and no background image is nearer, else -1 (also
        for rows without an image, and without an image channel). returns [B] int64."""
        x = _check_features(features, self.feature_width, "features", allow_empty=True, finite=False)
        out = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        if not self.image_dim or self.img_mean is None or not x.shape[0]:
            return out
        has = self._image_rows(x)
        if bool(has.any()):
            out[has] = self._image_decisions(x[has, self.dim:])
        return out

    def _image_decisions(self, img: torch.Tensor) -> torch.Tensor:
        """``route_images`` for rows known to have an image: their image columns [n, D_img] -> [n] int64."""
        c = self._image_index(img.device)
        if not c["n"]:
            return torch.full((img.shape[0],), -1, dtype=torch.long, device=img.device)
        best, e, tau = self._nearest_image(self._img_unit(img), c)
        return torch.where((e >= 0) & (best >= tau), e, torch.full_like(e, -1))

    @property
    def image_prototypes(self) -> list:
        """Per expert, its unit image prototypes [p_e, D_bi] (p_e = 0: none)."""
        out, n = [], 0
        for groups in self._igroups:
            p = sum(c for c, _ in groups)
            out.append(self._IP[n:n + p])
            n += p
        return out

    @property
    def image_background(self) -> torch.Tensor:
        """[n_bg, D_bi] the background's unit image rows (a view)."""
        return self._BG

    @property
    def prototypes(self) -> list:
        """Per expert, its unit prototypes [P_e, D] (P_e = 0: no similarity bound); views."""
        out, n = [], 0
        for c in self._pcount:
            out.append(self._P[n:n + c])
            n += c
        return out

    @property
    def sim_bounds(self) -> torch.Tensor:
        """[E] fp32 cosine bound of each expert (-2: none)."""
        return torch.tensor(self._tau, dtype=torch.float32)

    def similarity_to(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each query to each expert's nearest prototype (unit ``z``); +inf for an expert
        without prototypes. Every expert, so O(B * all prototypes): for analysis, not the routing path.
        features: [B, D]        returns [B, E] fp32"""
        x = self._text(_check_features(features, self.feature_width, "features", allow_empty=True, finite=False))
        E = len(self.expert_ids)
        out = torch.full((x.shape[0], E), float("inf"), device=x.device)
        if not E or not x.shape[0] or not sum(self._pcount):
            return out
        start, counts, _, _ = self._bounds(x.device)
        n = sum(self._pcount)
        s = self._unit_z(x) @ self._P[:n].to(x.device).t()  # [B, n]
        owner = torch.repeat_interleave(torch.arange(E, device=x.device), counts).expand(x.shape[0], -1)
        best = torch.full((x.shape[0], E), float("-inf"), device=x.device).scatter_reduce_(1, owner, s, "amax")
        return torch.where(counts.unsqueeze(0) > 0, best, out)

    def set_stacked(self, expert_ids: Sequence[str], weight: torch.Tensor, bias: torch.Tensor,
                    thresholds: Optional[torch.Tensor] = None, heads: Optional[Sequence[int]] = None,
                    protos: Optional[torch.Tensor] = None, proto_counts: Optional[Sequence[int]] = None,
                    sim_bounds: Optional[torch.Tensor] = None, names: Optional[Sequence] = None,
                    names_exact: Optional[Sequence] = None) -> None:
        """Install precomputed stacked heads, replacing all (loading, benchmarks): ``weight`` [H, F], ``bias`` [H]
        (calibrated), ``thresholds`` [H] (default 0), ``heads``: sub-heads per expert (default one each);
        similarity bounds: ``protos`` [sum(proto_counts), D] unit prototypes, ``proto_counts`` per expert (0: no
        bound), ``sim_bounds`` [E] (default: no bound for any expert); ``names``: per expert, its names as text
        (default none); ``names_exact``: per expert, those of its names matched exactly only (default none).
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
        x = self._text(_check_features(features, self.feature_width, "features", allow_empty=True, finite=False))
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

    def route(self, features: torch.Tensor, top_k: int = 1, renormalize: bool = True,
              texts: Optional[Sequence[str]] = None, has_image=None,
              identities: Optional[Sequence[Optional[str]]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts each query goes to: the ``top_k`` highest calibrated logits that fire, else -1.

        ``ops.topk_routing(scores, top_k, scoring="sigmoid", threshold=0.5)``; with ``renormalize`` (default) the
        surviving weights of a row sum to 1 (top_k = 1: weight 1 for a routed query, 0 for none). Then the
        similarity bound of each chosen expert must hold, else that choice becomes -1 (module docstring). With an
        image channel, a row with an image gets the image channel's expert instead (``route_images``; top-1).
        With no expert in the gate every query gets -1. With ``texts`` (each query's prompt text, as the user wrote
        it: no chat template, no image tokens), a row whose text names an expert's entity (``names``) goes to the
        named expert(s) instead, in order of first mention, weights equal, at most ``top_k``; ``has_image`` ([B]
        bools: which queries carry an image) tells ``text_by_name`` the text-only rows (module docstring).
        With ``identities`` ([B]: the base's answer to the identity question about each query's picture, None for a
        query without one: ``recognition.Recognizer``) and ``recognition`` on, a row with an answer is routed by
        names alone: to the experts named by its prompt, then those named by the answer (first mention first, as
        many as ``top_k``), else to none; its features are not scored.
        features: [B, D]        returns weights [B, top_k] fp32, ids [B, top_k] int32 (-1 = no expert)
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k={top_k!r}: expected an int >= 1")
        x = _check_features(features, self.feature_width, "features", allow_empty=True, finite=False)
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
        if identities is not None and self.recognition:
            ident = self._check_identities(identities, B)
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
        """``route`` for a batch where some rows carry the base's identity answer: those rows by names alone, the
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
        asked = self.name_hits([texts[b] for b in rec]) if texts is not None else [[] for _ in rec]
        for b, a, s in zip(rec, asked, said):
            h = list(dict.fromkeys(a + s))[:top_k]
            if h:
                ids[b, :len(h)] = torch.tensor(h, dtype=ids.dtype)
                weights[b, :len(h)] = 1.0 / len(h) if renormalize else 1.0
        return weights, ids

    @staticmethod
    def _check_identities(identities, B: int) -> list[Optional[str]]:
        if isinstance(identities, str) or not isinstance(identities, (list, tuple)) or \
                not all(t is None or isinstance(t, str) for t in identities):
            raise ValueError(f"identities: expected a list of the base's identity answers (a string per query with "
                             f"a picture, None without), got {type(identities).__name__}")
        if len(identities) != B:
            raise ValueError(f"identities: {len(identities)} answers for {B} queries; pass one per query")
        return list(identities)

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

    def _veto(self, features: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, renormalize: bool):
        """The similarity bound on the chosen experts only: a choice whose nearest prototype is under its expert's
        bound becomes -1 (weight 0); surviving weights are renormalised again with ``renormalize``.
        features: [B, D], weights / ids: [B, k]        returns weights [B, k] fp32, ids [B, k] int32"""
        start, counts, tau, pmax = self._bounds(ids.device)
        P = self._P if self._P.device == ids.device else self._P.to(ids.device)
        e = ids.long().clamp_min(0)                                   # [B, k]
        j = torch.arange(pmax, device=ids.device)
        idx = start[e].unsqueeze(-1) + j                              # [B, k, P_max]
        valid = j < counts[e].unsqueeze(-1)
        idx = torch.where(valid, idx, start[e].unsqueeze(-1)).clamp_max(max(P.shape[0] - 1, 0))
        u = self._unit_z(self._text(features).to(ids.device))         # [B, D]
        G = P.index_select(0, idx.reshape(-1)).view(*idx.shape, P.shape[1])  # [B, k, P_max, D_b]
        # a broadcast multiply-sum: bmm / einsum with one column is several times slower on CPU
        sims = (G * u[:, None, None, :]).sum(-1).masked_fill(~valid, float("-inf")).amax(-1)  # [B, k]
        keep = (ids >= 0) & ((sims >= tau[e]) | (counts[e] == 0))
        weights = torch.where(keep, weights, torch.zeros_like(weights))
        ids = torch.where(keep, ids, torch.full_like(ids, -1))
        if renormalize and ids.shape[1] > 1:
            weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-30)
        return weights, ids

    def route_ids(self, features: torch.Tensor) -> list[Optional[str]]:
        """Top-1 expert id of each query (None = no expert). features: [B, D]."""
        _, ids = self.route(features, 1)
        return [self.expert_ids[i] if i >= 0 else None for i in ids[:, 0].tolist()]

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
        """Write the gate into folder ``path``: ``gate-<sha>.safetensors`` (weight [H, F], bias [H], threshold [H],
        mean [D], std [D]) then ``gate.json`` (config, expert ids in routing order, head reports, the tensor file's
        name and sha256), each atomically; the JSON is the commit point, older tensor files are deleted after it.
        Returns the folder."""
        import hashlib

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().cpu().contiguous().clone(),
                   "bias": self.bias.detach().cpu().contiguous().clone(),
                   "threshold": self.thresholds.detach().cpu().contiguous().clone()}
        if self.mean is not None:
            tensors.update(mean=self.mean.detach().cpu().clone(), std=self.std.detach().cpu().clone())
        if self.basis is not None:
            tensors["basis"] = self.basis.detach().cpu().contiguous().clone()
        tensors.update(protos=self._P[:sum(self._pcount)].detach().cpu().contiguous().clone(),
                       sim_bounds=self.sim_bounds.contiguous())
        if self.img_mean is not None:
            tensors.update(img_mean=self.img_mean.detach().cpu().clone(), img_std=self.img_std.detach().cpu().clone(),
                           image_protos=self._IP[:self._n_image].detach().cpu().contiguous().clone(),
                           image_background=self._BG.detach().cpu().contiguous().clone())
            if self.img_basis is not None:
                tensors["img_basis"] = self.img_basis.detach().cpu().contiguous().clone()
        data = _st_save(tensors)
        sha = hashlib.sha256(data).hexdigest()
        name = f"gate-{sha[:16]}.safetensors"
        atomic_write(folder / name, data)
        meta = {"format": GATE_FORMAT, "version": GATE_FORMAT_VERSION, "config": self.config(),
                "expert_ids": list(self.expert_ids), "heads": list(self._heads), "proto_counts": list(self._pcount),
                "names": [list(n) for n in self._names], "names_exact": [list(n) for n in self._names_exact],
                "image_groups": [[[c, t] for c, t in g] for g in self._igroups],
                "tensors": name, "sha256": sha,
                "reports": {k: asdict(v) for k, v in self.reports.items()}}
        atomic_write(folder / GATE_JSON, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
        for old in folder.glob("gate-*.safetensors"):
            if old.name != name:
                try:
                    old.unlink()
                except OSError:
                    pass
        return folder

    @classmethod
    def load(cls, path, names: Optional[Mapping[str, Sequence[str]]] = None) -> "Gate":
        """A gate saved by ``save`` into folder ``path`` (checks format, sha256 and shapes).

        Versions 1-2 load without a name channel, version 3 without names if it had none. A version-3 file whose
        name channel holds token ids (the names as one tokenizer wrote them) cannot be read as text: it is a
        ``GateFormatError`` unless ``names`` gives {expert id: its names as text} for every expert (the requests'
        entities and aliases, e.g. from a ledger); save it again to write format v4."""
        import hashlib

        folder = Path(path)
        jpath = folder / GATE_JSON
        if not jpath.is_file():
            raise FileNotFoundError(f"{jpath} not found: expected a folder written by Gate.save")
        try:
            meta = json.loads(jpath.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{jpath}: not valid JSON ({exc})") from None
        if meta.get("format") != GATE_FORMAT or meta.get("version") not in (1, 2, 3, 4, GATE_FORMAT_VERSION):
            raise ValueError(f"{jpath}: format {meta.get('format')!r} v{meta.get('version')!r}, expected "
                             f"{GATE_FORMAT!r} v{GATE_FORMAT_VERSION}")
        tpath = folder / meta["tensors"]
        if not tpath.is_file():
            raise FileNotFoundError(f"{tpath} (named by {jpath}) not found")
        data = tpath.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError(f"{tpath}: sha256 does not match {jpath}; the file is corrupt")
        t = _st_load(data)
        config = dict(meta["config"])
        if meta.get("version") == 1:
            config.setdefault("similarity", None)  # version 1 gates had no similarity bound
            config.setdefault("bound_dim", None)
        gate = cls(**config)
        ids = list(meta["expert_ids"])
        heads = [int(h) for h in meta.get("heads", [1] * len(ids))]
        E, H = len(ids), sum(heads)
        if len(heads) != E or min(heads, default=1) < 1:
            raise ValueError(f"{jpath}: 'heads' {heads} must give a count >= 1 for each of the {E} experts")
        if tuple(t["weight"].shape) != (H, gate.head_dim) or tuple(t["bias"].shape) != (H,):
            raise ValueError(f"{tpath}: weight {tuple(t['weight'].shape)} / bias {tuple(t['bias'].shape)} do not "
                             f"match {H} sub-heads of width {gate.head_dim} in {jpath}")
        if "mean" in t:
            if tuple(t["mean"].shape) != (gate.dim,) or tuple(t["std"].shape) != (gate.dim,):
                raise ValueError(f"{tpath}: mean/std shapes {tuple(t['mean'].shape)} do not match dim {gate.dim}")
            gate.mean, gate.std = t["mean"], t["std"]
            if "basis" in t:
                if t["basis"].dim() != 2 or t["basis"].shape[0] != gate.dim:
                    raise ValueError(f"{tpath}: basis {tuple(t['basis'].shape)} does not match dim {gate.dim}")
                gate.basis = t["basis"]
        elif E:
            raise ValueError(f"{tpath}: {E} experts but no standardiser (mean/std); the file is incomplete")
        counts = [int(c) for c in meta.get("proto_counts", [0] * E)]
        protos = t.get("protos")
        if len(counts) != E or (protos is None and sum(counts)) or \
                (protos is not None and tuple(protos.shape) != (sum(counts), gate.bound_width)) or \
                ("sim_bounds" in t and tuple(t["sim_bounds"].shape) != (E,)):
            raise ValueError(f"{tpath}: prototypes {None if protos is None else tuple(protos.shape)} / sim_bounds do "
                             f"not match proto_counts {counts} of {jpath}")
        names_doc, exact_doc = meta.get("names"), meta.get("names_exact")  # versions 1-2: no name channel
        if names_doc is not None and (not isinstance(names_doc, list) or len(names_doc) != E):
            raise ValueError(f"{jpath}: 'names' must hold one list of names per expert ({E})")
        if meta.get("version") == 3:  # names as token ids: not text
            exact_doc = None
            if names_doc is not None and any(names_doc):
                missing = [] if names is None else [e for e in ids if e not in names]
                if names is None or missing:
                    n = sum(bool(x) for x in names_doc)
                    raise GateFormatError(
                        f"{jpath}: a format v3 gate whose name channel holds token ids ({n} of {E} experts have "
                        f"names); this version (v{GATE_FORMAT_VERSION}) matches names as text and cannot turn token "
                        f"ids back into names. A store converts it from its ledger: run `run.py process --store "
                        f"STORE` once; a stream run: run it again into a new --out (or pass Gate.load(names=...) "
                        f"the names of every expert" + (f"; missing: {missing[:5]}" if missing else "") + ")")
                names_doc = [list(names[e]) for e in ids]
            else:
                names_doc = None
        if exact_doc is not None and (not isinstance(exact_doc, list) or len(exact_doc) != E):
            raise ValueError(f"{jpath}: 'names_exact' must hold one list of names per expert ({E})")
        if E:
            gate.set_stacked(ids, t["weight"], t["bias"], t["threshold"], heads,
                             protos=protos if protos is not None else None,
                             proto_counts=counts if protos is not None else None, sim_bounds=t.get("sim_bounds"),
                             names=names_doc, names_exact=exact_doc)
        if "img_mean" in t:
            groups = meta.get("image_groups")
            n = sum(int(c) for g in (groups or []) for c, _ in g)
            if not isinstance(groups, list) or len(groups) != E or \
                    tuple(t["img_mean"].shape) != (gate.image_dim,) or "image_protos" not in t or \
                    t["image_protos"].shape[0] != n:
                raise ValueError(f"{tpath}: image channel tensors do not match image_groups / image_dim of {jpath}")
            gate.img_mean, gate.img_std = t["img_mean"], t["img_std"]
            gate.img_basis = t.get("img_basis")
            gate._IP, gate._BG = t["image_protos"], t["image_background"]
            gate._igroups = [[(int(c), float(tau)) for c, tau in g] for g in groups]
            gate._img_cache = None
        elif E and gate.image_dim:
            gate._igroups = [[] for _ in range(E)]
        gate.reports = {k: HeadReport(**v) for k, v in meta.get("reports", {}).items()}
        return gate

    def __repr__(self) -> str:
        return (f"Gate(layer={self.layer}, dim={self.dim}, pooling={self.pooling!r}, head={self.head!r}, "
                f"experts={len(self)}, target_fpr={self.target_fpr}, similarity={self.similarity})")
