"""The learned heads of the gate: one logistic head per expert (or per entity of a request) over standardised
pooled features, fitted with L-BFGS and calibrated alone on held-out negatives; the prototypes and principal
directions of the similarity bound. Pure functions and the ``HeadReport``; ``Gate.add_expert`` uses them.

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

Letters: B queries, D feature width (``dim``), F head input width (D or 2 D), E experts, H stacked sub-heads (>= E),
k top-k, P positives (P_max: most prototypes of one expert), Q negatives, S prompt positions.

"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch


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
    facts: list = field(default_factory=list)             # answer channel: the facts kept
    facts_dropped: list = field(default_factory=list)     # facts found in a negative's answer (dropped)
    fact_blockers: list = field(default_factory=list)     # negatives' longer facts containing a kept fact
    n_neg_answers: int = 0
    n_neg_texts: int = 0                  # negative texts the names were checked on


def check_features(x, dim: int, name: str, allow_empty: bool = False, finite: bool = True) -> torch.Tensor:
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


def calibration_split(n: int, share: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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


__all__ = ["HeadReport", "fit_logistic", "calibrate_threshold", "cover_prototypes", "principal_directions"]
