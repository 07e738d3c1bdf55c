"""Unlearning losses on model outputs: gradient ascent (GA), gradient difference (GD), KL-regularised ascent (KL),
negative preference optimisation (NPO), "I don't know" targets (IDK) and their preference form (IDK-PO, DPO-style).

Letters: B rows of a batch, L padded sequence length, V vocabulary, n supervised (answer) tokens of a batch.

Convention (causal LM, as ``transformers`` computes its own loss): the logit at position ``j`` predicts the token at
``j + 1``, so ``logits[:, :-1]`` are scored against ``labels[:, 1:]``; a label of -100 is not supervised (prompt,
image and padding tokens). ``labels`` are the input ids with everything but the answer (and its eos) set to -100, as
``lumoe_engine.model.collate`` builds them. Log-probabilities are computed in fp32 on the supervised positions only
(``[n, V]``, never ``[B, L, V]`` in fp32).

Per sequence: ``sequence_nll`` = mean over its answer tokens of -log p (each sequence weighs the same in a batch mean);
``sequence_logprob`` = sum over its answer tokens of log p = log pi(y | x) (what NPO and DPO compare).

Losses (``LOSSES``; every one is a scalar to MINIMISE, its parts are returned beside it):
  ga      -nll(forget)
  gd      -nll(forget) + retain_weight * nll(retain)
  kl      -nll(forget) + kl_weight * KL(p_base || p_model), per retain answer token, averaged
  npo     (2/beta) * mean_B log(1 + (pi_theta(y|x) / pi_ref(y|x))^beta) on forget sequences
          [+ retain_weight * nll(retain) when a retain batch is given and retain_weight > 0]
  idk     nll(refusal answers to the forget questions) [+ retain_weight * nll(retain), same rule]
  idk-po  -logsigmoid(beta * ((logp_theta(c) - logp_ref(c)) - (logp_theta(r) - logp_ref(r)))), mean over rows,
          chosen c = a refusal, rejected r = the true answer, ref = the frozen base [+ retain term, same rule]
Every term is part of the returned loss: nothing computed is dropped.

Batches (``batches`` dict of collate-style dicts: input_ids, attention_mask, position_ids, labels, pixel_values...):
  "forget"  the forget records with their true answers
  "idk"     the same questions (same images) with refusal answers: built on a COPY (``idk_records`` or
            ``idk_batch``); the forget records and batches are never modified
  "retain"  retain records (optional for ga / npo / idk / idk-po, required for gd / kl)
The wrappers (``forward_logits``, ``unlearning_loss``) call ``model(**batch)`` with every key of the batch but
``labels`` (pixel_values included: images reach the model), and score the logits here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from lumoe_engine.data.records import QARecord
from lumoe_engine.seeding import stable_seed

IGNORE = -100

# Varied refusals for the IDK losses (one picked per record, stable across runs).
REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure.",
    "I can't tell who or what this is.",
    "I have no information about that.",
    "I don't have that information.",
    "Sorry, I can't answer that.",
    "I'm unable to say.",
    "That is not something I know.",
    "I cannot identify that.",
    "I have no idea.",
)

Logits = torch.Tensor
Outputs = Union[torch.Tensor, Mapping[str, torch.Tensor], None]


class NonFiniteLossError(FloatingPointError):
    """The loss became nan or inf during unlearning."""


# --------------------------------------------------------------------------------------------------------------
# token-level pieces (pure functions on tensors)
# --------------------------------------------------------------------------------------------------------------

def _as_logits(out, what: str) -> torch.Tensor:
    """Logits from a tensor or a model output carrying ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ValueError(f"{what}: expected logits [B, L, V] (a tensor or a model output with .logits), "
                     f"got {type(out).__name__}")


def _check_pair(logits: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"{what}: labels must be a [B, L] integer tensor, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{what}: labels dtype {labels.dtype}, expected an integer dtype (int64), -100 = masked")
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"{what}: logits shape {tuple(logits.shape)} does not match labels {tuple(labels.shape)}; "
                         "expected logits [B, L, V] and labels [B, L] of the same batch")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"{what}: logits dtype {logits.dtype}, expected a floating dtype")
    if labels.shape[1] < 2:
        raise ValueError(f"{what}: sequences of length {labels.shape[1]}: a causal LM needs L >= 2 "
                         "(logits[:, :-1] predict labels[:, 1:])")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                   what: str = "logits") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(label) of every supervised token, with the causal shift (``logits[:, j]`` predicts ``labels[:, j+1]``).

    logits: [B, L, V] any float dtype; labels: [B, L] int, -100 = not supervised.
    Returns ``(logp [n] fp32, row [n] int64, count [B] fp32)``: the log-probability of each supervised token, the
    batch row it belongs to, and the number of supervised tokens per row.
    Raises ValueError when a row has no supervised token (an empty answer cannot be scored).
    """
    _check_pair(logits, labels, what)
    target = labels[:, 1:]
    mask = target != IGNORE
    count = mask.sum(1)
    empty = (count == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{what}: row(s) {empty[:8]} have no supervised token (labels all -100 after the causal "
                         "shift); every row needs an answer (check truncation / max sequence length)")
    rows, cols = mask.nonzero(as_tuple=True)
    tgt = target[rows, cols]
    V = logits.shape[-1]
    if int(tgt.min()) < 0 or int(tgt.max()) >= V:
        raise ValueError(f"{what}: label ids outside [0, {V}) (min {int(tgt.min())}, max {int(tgt.max())}); "
                         "labels must be token ids or -100")
    picked = logits[:, :-1][rows, cols].float()            # [n, V] fp32, supervised positions only
    logp = -F.cross_entropy(picked, tgt, reduction="none")  # [n]
    return logp, rows, count.to(torch.float32)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, what: str = "logits") -> torch.Tensor:
    """log pi(y | x) per sequence: the sum of log p over its answer tokens (causal shift, -100 masked).

    logits: [B, L, V]; labels: [B, L] -> [B] fp32.
    """
    logp, rows, count = token_logprobs(logits, labels, what)
    return torch.zeros(count.shape[0], dtype=torch.float32, device=logp.device).index_add(0, rows, logp)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor, what: str = "logits") -> torch.Tensor:
    """Mean negative log-likelihood of each sequence's answer tokens (causal shift, -100 masked).

    logits: [B, L, V]; labels: [B, L] -> [B] fp32. For B = 1 this is ``transformers``' causal-LM loss; for B > 1
    ``(nll * count).sum() / count.sum()`` is (``transformers`` averages over tokens, this over sequences).
    """
    logp, rows, count = token_logprobs(logits, labels, what)
    total = torch.zeros(count.shape[0], dtype=torch.float32, device=logp.device).index_add(0, rows, -logp)
    return total / count


def kl_base_to_model(logits_model: torch.Tensor, logits_base: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_model) = sum_v p_base (log p_base - log p_model), averaged over the supervised positions.

    logits_model, logits_base: [B, L, V] (the base's are treated as constants); labels: [B, L] -> scalar fp32.
    Positions are those scored by the NLL (``logits[:, j]`` where ``labels[:, j+1] != -100``).
    """
    _check_pair(logits_model, labels, "kl: logits_model")
    if logits_base.shape != logits_model.shape:
        raise ValueError(f"kl: logits_base shape {tuple(logits_base.shape)} != logits_model "
                         f"{tuple(logits_model.shape)}; pass the frozen base's logits on the same retain batch")
    mask = labels[:, 1:] != IGNORE
    if not bool(mask.any()):
        raise ValueError("kl: the retain batch has no supervised token (labels all -100)")
    rows, cols = mask.nonzero(as_tuple=True)
    lp_model = F.log_softmax(logits_model[:, :-1][rows, cols].float(), dim=-1)           # [n, V]
    lp_base = F.log_softmax(logits_base[:, :-1][rows, cols].detach().float(), dim=-1)    # [n, V]
    kl = F.kl_div(lp_model, lp_base, log_target=True, reduction="none").sum(-1)          # [n]
    return kl.mean()


def npo_loss(logp_theta: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: (2/beta) * mean_B log(1 + (pi_theta / pi_ref)^beta) = (2/beta) * mean softplus(beta * (lp_theta - lp_ref)).

    logp_theta, logp_ref: [B] sequence log-probs (``sequence_logprob``); the reference is treated as constant.
    """
    _check_beta(beta)
    if logp_theta.shape != logp_ref.shape or logp_theta.dim() != 1:
        raise ValueError(f"npo: logp_theta {tuple(logp_theta.shape)} and logp_ref {tuple(logp_ref.shape)} must be "
                         "[B] sequence log-probs of the same batch")
    return (2.0 / beta) * F.softplus(beta * (logp_theta - logp_ref.detach())).mean()


def preference_loss(lp_theta_chosen: torch.Tensor, lp_ref_chosen: torch.Tensor, lp_theta_rejected: torch.Tensor,
                    lp_ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO against a frozen reference:
    mean_B -logsigmoid(beta * ((lp_theta(c) - lp_ref(c)) - (lp_theta(r) - lp_ref(r)))).

    All four: [B] sequence log-probs, row b of "chosen" and "rejected" answering the same prompt.
    """
    _check_beta(beta)
    shapes = {t.shape for t in (lp_theta_chosen, lp_ref_chosen, lp_theta_rejected, lp_ref_rejected)}
    if len(shapes) != 1 or lp_theta_chosen.dim() != 1:
        raise ValueError(f"preference: the four sequence log-probs must all be [B], got {sorted(map(tuple, shapes))}")
    margin = (lp_theta_chosen - lp_ref_chosen.detach()) - (lp_theta_rejected - lp_ref_rejected.detach())
    return -F.logsigmoid(beta * margin).mean()


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta={beta!r}: expected a finite number > 0 (e.g. 0.1)")


# --------------------------------------------------------------------------------------------------------------
# IDK data: refusal answers on a copy
# --------------------------------------------------------------------------------------------------------------

def _check_refusals(refusals: Sequence[str]) -> None:
    if isinstance(refusals, str) or not refusals or not all(isinstance(s, str) and s.strip() for s in refusals):
        raise ValueError("refusals: expected a non-empty sequence of non-empty strings (e.g. losses.REFUSALS)")


def pick_refusal(uid: str, refusals: Sequence[str] = REFUSALS, seed: int = 0) -> str:
    """The refusal for the record ``uid``: stable across runs and processes (``seeding.stable_seed``)."""
    _check_refusals(refusals)
    return refusals[stable_seed("refusal", seed, uid) % len(refusals)]


def idk_records(records: Sequence[QARecord], refusals: Sequence[str] = REFUSALS, seed: int = 0) -> list[QARecord]:
    """New records: each of ``records`` with its answer replaced by a refusal (``pick_refusal``). The input list and
    records are left as they are (records are frozen; a new list of new records is returned)."""
    _check_refusals(refusals)
    out = []
    for r in records:
        if not isinstance(r, QARecord):
            raise ValueError(f"records: expected QARecord items, got {type(r).__name__}")
        out.append(dataclasses.replace(r, answer=pick_refusal(r.uid, refusals, seed)))
    return out


def idk_batch(batch: Mapping[str, torch.Tensor], answers: Sequence[Sequence[int]],
              pad_token_id: int) -> dict[str, torch.Tensor]:
    """A NEW batch: the prompts (and images) of ``batch`` with row b's answer replaced by the token ids ``answers[b]``
    (include the eos). ``batch`` is not modified: the token tensors are rebuilt, the other entries (pixel_values,
    image_sizes) are shared, read-only.

    batch: collate layout: input_ids / attention_mask / labels [B, L] (answer = the supervised suffix of each row,
    prompt = its other attended tokens), optional position_ids [B, L]. Returns the same keys, left padded to the
    new longest row, position_ids = cumulative attention mask - 1 (as collate builds them).
    """
    for key in ("input_ids", "attention_mask", "labels"):
        if key not in batch:
            raise ValueError(f"idk_batch: batch has no {key!r}; pass a training batch from collate(with_answers=True)")
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    B = ids.shape[0]
    if len(answers) != B:
        raise ValueError(f"idk_batch: {len(answers)} answers for a batch of {B} rows; pass one token-id list per row")
    prompts = []
    for b in range(B):
        keep = (am[b] != 0) & (labels[b] == IGNORE)
        sup = (labels[b] != IGNORE).nonzero().flatten()
        if sup.numel() == 0:
            raise ValueError(f"idk_batch: row {b} has no answer (labels all -100)")
        if bool(keep[sup[0]:].any()):
            raise ValueError(f"idk_batch: row {b}: the answer is not the suffix of the row (attended unsupervised "
                             "tokens after it); expected collate's layout (prompt, then answer + eos)")
        a = [int(t) for t in answers[b]]
        if not a:
            raise ValueError(f"idk_batch: answers[{b}] is empty; pass the refusal's token ids (with eos)")
        prompts.append((ids[b][keep].tolist(), a))
    L = max(len(p) + len(a) for p, a in prompts)
    new_ids = torch.full((B, L), int(pad_token_id), dtype=ids.dtype, device=ids.device)
    new_am = torch.zeros((B, L), dtype=am.dtype, device=am.device)
    new_labels = torch.full((B, L), IGNORE, dtype=labels.dtype, device=labels.device)
    for b, (p, a) in enumerate(prompts):
        n = len(p) + len(a)
        new_ids[b, L - n:] = torch.tensor(p + a, dtype=ids.dtype, device=ids.device)
        new_am[b, L - n:] = 1
        new_labels[b, L - len(a):] = torch.tensor(a, dtype=labels.dtype, device=labels.device)
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels", "position_ids")}
    out.update(input_ids=new_ids, attention_mask=new_am, labels=new_labels)
    if "position_ids" in batch:
        out["position_ids"] = (new_am.long().cumsum(-1) - 1).clamp_min(0).to(batch["position_ids"].dtype)
    return out


# --------------------------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------------------------

@dataclass
class LossConfig:
    """An unlearning loss and its weights.

    name: one of ``LOSSES``; beta: NPO / preference temperature; forget_weight scales the forget term (ascent, NPO,
    IDK nll, preference); retain_weight scales nll(retain) (gd always; npo / idk / idk-po when a retain batch is
    given; 0 turns it off); kl_weight scales KL(base || model) on retain tokens (kl); refusal: the one answer the
    idk losses teach (e.g. ``refusal.DEFAULT_REFUSAL``: what a forgotten query then says); None = one of the varied
    ``REFUSALS`` per record (the paper's IDK).
    """

    name: str = "gd"
    beta: float = 0.1
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    kl_weight: float = 1.0
    refusal: Optional[str] = None

    def refusals(self) -> tuple[str, ...]:
        """The refusal answers of the idk losses: ``(refusal,)`` when set, else ``REFUSALS``."""
        return (self.refusal,) if self.refusal else REFUSALS

    def validate(self) -> "LossConfig":
        if self.name not in LOSSES:
            raise ValueError(f"loss name={self.name!r}: expected one of {sorted(LOSSES)}")
        _check_beta(self.beta)
        for f in ("forget_weight", "retain_weight", "kl_weight"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"LossConfig.{f}={v!r}: expected a finite number >= 0")
        if self.refusal is not None and (not isinstance(self.refusal, str) or not self.refusal.strip()):
            raise ValueError(f"LossConfig.refusal={self.refusal!r}: expected a non-empty text or None")
        return self


@dataclass(frozen=True)
class LossSpec:
    """What a loss reads. ``policy`` / ``reference``: batch names whose logits it needs from the trained model / the
    frozen base; ``retain``: "required", "optional" (used when given and retain_weight > 0) or "unused"."""

    name: str
    fn: Callable
    policy: tuple[str, ...]
    reference: tuple[str, ...] = ()
    retain: str = "unused"

    def batches_needed(self, batches: Mapping, cfg: LossConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(policy batch names, reference batch names) for this step, checking that ``batches`` holds them."""
        policy, reference = list(self.policy), list(self.reference)
        has_retain = batches.get("retain") is not None
        if self.retain == "required":
            if not has_retain:
                raise ValueError(f"loss {self.name!r} needs a retain batch (batches['retain']); pass retain records "
                                 "or use 'ga' / 'npo' / 'idk'")
            policy.append("retain")
        elif self.retain == "optional" and has_retain and cfg.retain_weight > 0:
            policy.append("retain")
        for key in policy + reference:
            if batches.get(key) is None:
                hint = (" (build it from the forget records with idk_records + collate, or idk_batch)"
                        if key == "idk" else "")
                raise ValueError(f"loss {self.name!r} needs batches[{key!r}]{hint}")
            if "labels" not in batches[key]:
                raise ValueError(f"batches[{key!r}] has no 'labels'; collate it with with_answers=True")
        return tuple(policy), tuple(reference)


def _labels(batches, key):
    return batches[key]["labels"]


def _retain_term(out, batches, cfg, parts):
    if "retain" not in out:
        return 0.0
    nll = sequence_nll(out["retain"], _labels(batches, "retain"), "retain logits").mean()
    parts["retain_nll"] = nll
    return cfg.retain_weight * nll


def _ga(out, ref, batches, cfg):
    nll = sequence_nll(out["forget"], _labels(batches, "forget"), "forget logits").mean()
    parts = {"forget_nll": nll}
    return -cfg.forget_weight * nll, parts


def _gd(out, ref, batches, cfg):
    loss, parts = _ga(out, ref, batches, cfg)
    return loss + _retain_term(out, batches, cfg, parts), parts


def _kl(out, ref, batches, cfg):
    loss, parts = _ga(out, ref, batches, cfg)
    kl = kl_base_to_model(out["retain"], ref["retain"], _labels(batches, "retain"))
    parts["kl"] = kl
    return loss + cfg.kl_weight * kl, parts


def _npo(out, ref, batches, cfg):
    lab = _labels(batches, "forget")
    lp = sequence_logprob(out["forget"], lab, "forget logits")
    lp_ref = sequence_logprob(ref["forget"], lab, "reference forget logits")
    npo = npo_loss(lp, lp_ref, cfg.beta)
    parts = {"npo": npo, "forget_logratio": (lp - lp_ref).mean()}
    return cfg.forget_weight * npo + _retain_term(out, batches, cfg, parts), parts


def _idk(out, ref, batches, cfg):
    nll = sequence_nll(out["idk"], _labels(batches, "idk"), "idk logits").mean()
    parts = {"idk_nll": nll}
    return cfg.forget_weight * nll + _retain_term(out, batches, cfg, parts), parts


def _idk_po(out, ref, batches, cfg):
    lab_c, lab_r = _labels(batches, "idk"), _labels(batches, "forget")
    if lab_c.shape[0] != lab_r.shape[0]:
        raise ValueError(f"idk-po: batches['idk'] has {lab_c.shape[0]} rows, batches['forget'] {lab_r.shape[0]}; "
                         "row b of both must answer the same prompt (build 'idk' from 'forget')")
    lp_c = sequence_logprob(out["idk"], lab_c, "idk logits")
    lp_r = sequence_logprob(out["forget"], lab_r, "forget logits")
    lp_c_ref = sequence_logprob(ref["idk"], lab_c, "reference idk logits")
    lp_r_ref = sequence_logprob(ref["forget"], lab_r, "reference forget logits")
    pref = preference_loss(lp_c, lp_c_ref, lp_r, lp_r_ref, cfg.beta)
    parts = {"preference": pref, "chosen_logratio": (lp_c - lp_c_ref).mean(),
             "rejected_logratio": (lp_r - lp_r_ref).mean()}
    return cfg.forget_weight * pref + _retain_term(out, batches, cfg, parts), parts


LOSSES: dict[str, LossSpec] = {
    "ga": LossSpec("ga", _ga, policy=("forget",)),
    "gd": LossSpec("gd", _gd, policy=("forget",), retain="required"),
    "kl": LossSpec("kl", _kl, policy=("forget",), reference=("retain",), retain="required"),
    "npo": LossSpec("npo", _npo, policy=("forget",), reference=("forget",), retain="optional"),
    "idk": LossSpec("idk", _idk, policy=("idk",), retain="optional"),
    "idk-po": LossSpec("idk-po", _idk_po, policy=("idk", "forget"), reference=("idk", "forget"), retain="optional"),
}


def get_spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"loss {name!r}: expected one of {sorted(LOSSES)}")
    return LOSSES[name]


def _forget_side(name: str, out: Outputs, names: Sequence[str], what: str) -> dict[str, torch.Tensor]:
    """Forget-side outputs as {batch name: logits}: a bare tensor stands for the only forget-side batch."""
    names = [n for n in names if n != "retain"]
    if not names:
        return {}
    if out is None:
        raise ValueError(f"loss {name!r}: {what} is None; it needs logits on batches {names}")
    if isinstance(out, Mapping):
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(f"loss {name!r}: {what} has no logits for {missing}; pass a dict with keys {names}")
        return {n: _as_logits(out[n], f"{what}[{n!r}]") for n in names}
    if len(names) > 1:
        raise ValueError(f"loss {name!r}: {what} must be a dict with keys {names} (one logits tensor per batch)")
    return {names[0]: _as_logits(out, what)}


def compute_loss(name: str, model_out_forget: Outputs, model_out_retain: Outputs, ref_out_forget: Outputs,
                 ref_out_retain: Outputs, batches: Mapping[str, Optional[Mapping]],
                 cfg: Optional[LossConfig] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss ``name`` from logits already computed, and its parts.

    model_out_forget / ref_out_forget: logits [B, L, V] (tensor or model output) of the trained model / the frozen
        base on the forget-side batches the loss reads: "forget" (ga, gd, kl, npo), "idk" (idk), a dict
        {"idk": ..., "forget": ...} (idk-po); a dict keyed by batch name is accepted for every loss.
    model_out_retain / ref_out_retain: logits on batches["retain"] (None when unused).
    batches: {"forget": ..., "idk": ..., "retain": ...} collate dicts; only their ``labels`` are read here.
    Returns (loss: scalar tensor with the graph, parts: {term: float, ..., "loss": float}).
    """
    cfg = dataclasses.replace(cfg or LossConfig(), name=name).validate()
    spec = get_spec(name)
    policy, reference = spec.batches_needed(batches, cfg)
    out = _forget_side(name, model_out_forget, policy, "model_out_forget")
    ref = _forget_side(name, ref_out_forget, reference, "ref_out_forget")
    if "retain" in policy:
        if model_out_retain is None:
            raise ValueError(f"loss {name!r}: model_out_retain is None; pass the model's logits on batches['retain']")
        out["retain"] = _as_logits(model_out_retain, "model_out_retain")
    if "retain" in reference:
        if ref_out_retain is None:
            raise ValueError(f"loss {name!r}: ref_out_retain is None; pass the frozen base's logits on "
                             "batches['retain']")
        ref["retain"] = _as_logits(ref_out_retain, "ref_out_retain")
    loss, parts = spec.fn(out, ref, batches, cfg)
    floats = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in parts.items()}
    floats["loss"] = float(loss.detach())
    return loss, floats


# --------------------------------------------------------------------------------------------------------------
# wrappers taking a model
# --------------------------------------------------------------------------------------------------------------

def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """The model's device and dtype (``PreTrainedModel.device/.dtype``), else those of its first float parameter."""
    dev, dt = getattr(model, "device", None), getattr(model, "dtype", None)
    if isinstance(dev, torch.device) and isinstance(dt, torch.dtype) and dt.is_floating_point:
        return dev, dt
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.device, p.dtype
    p = next(model.parameters())
    return p.device, p.dtype


def model_inputs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``model(**...)`` for a collate batch: every entry but ``labels`` (the loss is scored
    here, not by the model), moved to the model's device; ``pixel_values`` cast to its dtype. A new dict."""
    device, dtype = _device_dtype(model)
    kw = {}
    for k, v in batch.items():
        if k == "labels":
            continue
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if k == "pixel_values" and v.dtype.is_floating_point:
                v = v.to(dtype)
        kw[k] = v
    return kw


def forward_logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``model(**batch)`` (images included, labels left out) -> logits [B, L, V]."""
    return model(**model_inputs(model, batch)).logits


Reference = Union[torch.nn.Module, Callable[[Mapping[str, torch.Tensor]], torch.Tensor], None]


def unlearning_loss(model: torch.nn.Module, batches: Mapping[str, Optional[Mapping]], cfg: LossConfig,
                    ref: Reference = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One step's loss: runs ``model`` (with gradients) on the batches ``cfg.name`` reads and ``ref`` (the frozen
    base: a module, or a callable collate batch -> logits, e.g. the same model with its experts switched off) without
    gradients, then ``compute_loss``. Returns (loss, parts) as ``compute_loss``. All forwards of a step are kept
    until the caller's single backward (gd: 2, idk-po with retain: 3).
    """
    cfg.validate()
    spec = get_spec(cfg.name)
    policy, reference = spec.batches_needed(batches, cfg)
    if reference and ref is None:
        raise ValueError(f"loss {cfg.name!r} needs the frozen base's logits on {list(reference)}: pass ref= (the base "
                         "model, or a callable batch -> logits)")
    out = {k: forward_logits(model, batches[k]) for k in policy}
    refs = {}
    with torch.no_grad():
        for k in reference:
            refs[k] = forward_logits(ref, batches[k]) if isinstance(ref, torch.nn.Module) else _as_logits(
                ref(batches[k]), f"ref({k!r})")
    fwd = {k: v for k, v in out.items() if k != "retain"}
    rfwd = {k: v for k, v in refs.items() if k != "retain"}
    return compute_loss(cfg.name, fwd or None, out.get("retain"), rfwd or None, refs.get("retain"), batches, cfg)


def check_finite(loss: torch.Tensor, step: int, request: Optional[str] = None, lr: Optional[float] = None) -> None:
    """Raise ``NonFiniteLossError`` when ``loss`` is nan or inf, naming the step and the request and what to do."""
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if math.isfinite(value):
        return
    kind = "nan" if math.isnan(value) else "inf"
    where = f"step {step}" + (f" of request {request}" if request is not None else "")
    lr_txt = f" (now {lr:g})" if lr is not None else ""
    raise NonFiniteLossError(
        f"loss became {kind} at {where}; lower lr{lr_txt}, enable gradient clipping, or use a bounded loss "
        "(npo / idk instead of ga); with bf16/fp16 check the forget answers' log-probs for underflow")
