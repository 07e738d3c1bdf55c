"""Gate features: the base model's own hidden states of image + prompt, pooled into one vector per query.

A query's feature is ``pool(h_L, attention_mask)``, where ``h_L`` is the output of decoder layer ``L`` (0-based index
into the language model's ``layers``) during the forward pass of the prompt alone (no answer: the collate's
generation prompt), with no expert active. The engine computes the same thing from a forward hook on that layer
during prefill, so the features the gate is trained on and the features it routes at inference are equal (when
experts are applied only above layer ``L``, the hook reads the same forward pass that generates).

Pooling modes (``POOLINGS``), all over the positions where ``attention_mask`` is 1 (image positions included):

- ``mean``: the mean hidden state;                 D_out = D
- ``last``: the state of the last prompt position (the one that predicts the answer's first token);  D_out = D
- ``mean_last``: ``[mean, last]`` concatenated;     D_out = 2 D
- ``mean_max``: ``[mean, max]`` concatenated;       D_out = 2 D

The image channel's features (``image_pool``): ``[mean, max]`` of ``h_L`` over the row's image positions (where
``input_ids`` is the image token), D_img = 2 D; a row without image tokens gets zeros. In a LLaVA prompt the image
comes before the question, so under causal attention these states do not depend on the wording of the question at
all: a reworded query about the same picture has the same image features.

Gate training queries beyond a request's own: ``counterfactual_records`` (hard negatives: its images asked other
classes' questions, its questions asked of other classes' images) and ``augmented_records`` (rewordings as positives).

Letters: B rows (queries), S sequence positions, D hidden size of the language model, N records.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from lumoe_engine.data.records import QARecord

POOLINGS = ("mean", "last", "mean_last", "mean_max")


def pooled_dim(dim: int, pooling: str) -> int:
    """Width of ``pool``'s output for hidden size ``dim`` and ``pooling``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}: expected one of {POOLINGS}")
    return 2 * dim if pooling in ("mean_last", "mean_max") else dim


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Pool the hidden states of each row over its attended positions (see the module docstring for the modes).

    hidden: [B, S, D] fp32/fp16/bf16        attention_mask: [B, S] (0 = padding, anything else = attended)
    returns [B, D] fp32 (``mean``, ``last``) or [B, 2 D] fp32 (``mean_last``, ``mean_max``).
    Works with left or right padding; a row without any attended position is an error.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}: expected one of {POOLINGS}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden: expected a floating tensor [B, S, D], got {shape}")
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else \
            type(attention_mask).__name__
        raise ValueError(f"attention_mask: expected shape [B, S] = {tuple(hidden.shape[:2])} (that of hidden's first "
                         f"two dims), got {shape}")
    m = (attention_mask != 0).to(hidden.device)
    count = m.sum(dim=1)
    if hidden.shape[0] and bool((count == 0).any()):
        raise ValueError("attention_mask: a row has no attended position; every query needs at least one token")
    h = hidden.float()
    mf = m.unsqueeze(-1).float()
    parts = []
    if pooling in ("mean", "mean_last", "mean_max"):
        parts.append((h * mf).sum(dim=1) / count.unsqueeze(-1).float())
    if pooling in ("last", "mean_last"):
        S = hidden.shape[1]
        pos = torch.arange(S, device=hidden.device).expand_as(m)
        last = torch.where(m, pos, torch.full_like(pos, -1)).amax(dim=1)  # last attended position of each row
        parts.append(h[torch.arange(h.shape[0], device=h.device), last])
    if pooling == "mean_max":
        parts.append(h.masked_fill(~m.unsqueeze(-1), float("-inf")).amax(dim=1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def image_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, input_ids: torch.Tensor,
               image_token_id: int) -> torch.Tensor:
    """``[mean, max]`` of each row's hidden states over its image positions (``input_ids == image_token_id`` and
    attended); zeros for a row without any. hidden: [B, S, D], attention_mask / input_ids: [B, S] -> [B, 2 D] fp32."""
    if not isinstance(input_ids, torch.Tensor) or tuple(input_ids.shape) != tuple(hidden.shape[:2]):
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected shape [B, S] = {tuple(hidden.shape[:2])}, got {shape}")
    m = (input_ids == image_token_id) & (attention_mask != 0)
    h = hidden.float()
    count = m.sum(1, keepdim=True)
    mf = m.unsqueeze(-1)
    mean = (h * mf).sum(1) / count.clamp_min(1)
    mx = h.masked_fill(~mf, float("-inf")).amax(1)
    out = torch.cat([mean, mx], -1)
    return torch.where(count > 0, out, torch.zeros_like(out))


def image_token_id_of(model) -> Optional[int]:
    """The image placeholder token id of a LLaVA-style ``model`` (``config.image_token_id`` / ``image_token_index``),
    None for a model without one."""
    cfg = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of the language model of ``model`` (a LLaVA / LLaVA-NeXT or a plain causal LM)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(dec, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    for name, mod in model.named_modules():  # fallback: the first "layers" list outside the vision tower
        if name.endswith("layers") and isinstance(mod, torch.nn.ModuleList) and "vision" not in name:
            return mod
    raise ValueError(f"model {type(model).__name__}: no decoder layers found (expected get_decoder().layers)")


def check_layer(model, layer: int) -> int:
    """``layer`` if it indexes a decoder layer of ``model`` (0 <= layer < number of layers), else ValueError."""
    n = len(decoder_layers(model))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer={layer!r}: expected an int in [0, {n}) (the model has {n} decoder layers)")
    return layer


class _Stop(Exception):
    """Raised by the capture hook once the deepest needed layer ran (the layers above do not change the features)."""


def _prompt_batch(model, processor, rows: Sequence[QARecord], image_fn) -> dict:
    from lumoe_engine.model.collate import collate

    batch = collate(rows, processor, with_answers=False, image_fn=image_fn)
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
    return batch


@torch.no_grad()
def layer_features(model, processor, records: Sequence[QARecord], layers: Sequence[int],
                   poolings: Sequence[str] = ("mean",), batch_size: int = 64,
                   image_fn: Optional[Callable[[QARecord], object]] = None, image: bool = False
                   ) -> dict[tuple[int, str], torch.Tensor]:
    """Features of ``records`` for several (layer, pooling) pairs from one forward pass per batch; with ``image``,
    also the image channel's ``image_pool`` of each layer under the key (layer, "image") ([N, 2 D]).

    Prompts only (``collate(with_answers=False)``): image+text records with their image (``image_fn``, default the
    benchmark loader), text-only records without any. The model runs in eval mode; its mode is restored.
    returns {(layer, pooling): [N, D_out] fp32 on CPU}
    """
    layers = sorted({check_layer(model, int(L)) for L in layers})
    for p in poolings:
        pooled_dim(1, p)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    image_id = image_token_id_of(model) if image else None
    if image and image_id is None:
        raise ValueError(f"image=True: model {type(model).__name__} has no image token id in its config")
    kinds = list(poolings) + (["image"] if image else [])
    out: dict[tuple[int, str], list[torch.Tensor]] = {(L, p): [] for L in layers for p in kinds}
    blocks = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook_for(L):
        def hook(module, args, output):
            captured[L] = output[0] if isinstance(output, (tuple, list)) else output
            if L == deepest:
                raise _Stop

        return hook

    handles = [blocks[L].register_forward_hook(hook_for(L)) for L in layers]
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(records), batch_size):
            batch = _prompt_batch(model, processor, list(records[s:s + batch_size]), image_fn)
            captured.clear()
            try:
                model(**batch, use_cache=False)
            except _Stop:
                pass
            mask = batch["attention_mask"]
            for L in layers:
                for p in poolings:
                    out[(L, p)].append(pool(captured[L], mask, p).cpu())
                if image:
                    out[(L, "image")].append(image_pool(captured[L], mask, batch["input_ids"], image_id).cpu())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not records:
        hidden = model.config.get_text_config().hidden_size
        return {(L, p): torch.zeros(0, pooled_dim(hidden, p) if p != "image" else 2 * hidden)
                for L in layers for p in kinds}
    return {k: torch.cat(v) for k, v in out.items()}


def base_features(model, processor, records: Sequence[QARecord], layer: int, batch_size: int = 64,
                  pooling: str = "mean", image_fn: Optional[Callable[[QARecord], object]] = None,
                  image: bool = False) -> torch.Tensor:
    """The gate features of ``records``: ``pool(output of decoder layer `layer`, attention_mask, pooling)`` of the
    prompt-only forward pass (no answer, no expert active; images fed for image+text records); with ``image``,
    followed by the image channel's ``image_pool`` of the same layer.

    returns [N, D_out] fp32 on CPU (D_out = ``pooled_dim(hidden size, pooling)``, + 2 D with ``image``)
    """
    f = layer_features(model, processor, records, [layer], [pooling], batch_size, image_fn, image=image)
    return torch.cat([f[(layer, pooling)], f[(layer, "image")]], 1) if image else f[(layer, pooling)]


# ---------------------------------------------------------------------------------------- gate training queries
def counterfactual_records(records: Sequence[QARecord], pool: Sequence[QARecord], n_question: int = 3,
                           n_name: int = 0, n_image: int = 1, seed: int = 0) -> list[QARecord]:
    """Hard negatives for the gate head of a request: its identity recombined with other classes' questions, and
    its questions asked about other classes' images.

    The gate must fire on the request's entity however it is asked, and not on a look-alike entity of another
    class; a head fitted only on real queries may key on a colour shared with an entity it never saw. These
    recombinations put the request's images and names next to wordings of other classes (and its wordings next to
    other images), labelled negative:

    - per image+text record: ``n_question`` copies with the question of a random ``pool`` image+text record of
      another class (``uid = "cfq<j>#<uid>"``), and ``n_image`` copies of a random pool image+text record of another
      class asked this record's question (``"cfi<j>#<uid>"``, the pool record's entity and image);
    - per text-only record: ``n_name`` copies of a random pool text-only question of another class, with the pool
      entity's name replaced by this record's entity (``"cfn<j>#<uid>"``).

    A wording that one of ``records`` uses itself (classes can share a question) is never drawn.

    records: the request's queries; pool: queries of other entities (e.g. retain sets) to draw wordings and images
    from. Deterministic for a seed. Returns the new records (features: ``base_features``).
    """
    import dataclasses
    import random

    rng = random.Random(seed)
    by_form: dict[str, list[QARecord]] = {"image_text": [], "text_only": []}
    for p in pool:
        by_form[p.form].append(p)
    own = {r.question for r in records}  # a wording the request itself uses is never made a negative
    out: list[QARecord] = []
    for r in records:
        other = [p for p in by_form[r.form] if p.cls != r.cls and p.entity != r.entity]
        if r.form == "image_text":
            asked = [p for p in other if p.question not in own]
            for j in range(n_question if asked else 0):
                out.append(dataclasses.replace(r, uid=f"cfq{j}#{r.uid}", question=rng.choice(asked).question))
            for j in range(n_image if other else 0):
                o = rng.choice(other)
                out.append(dataclasses.replace(o, uid=f"cfi{j}#{r.uid}", question=r.question))
        else:
            named = [p for p in other if p.entity in p.question
                     and p.question.replace(p.entity, r.entity) not in own]
            for j in range(n_name if named else 0):
                o = rng.choice(named)
                out.append(dataclasses.replace(r, uid=f"cfn{j}#{r.uid}",
                                               question=o.question.replace(o.entity, r.entity)))
    return out


def augmented_records(records: Sequence[QARecord], n: int = 2, seed: int = 0, synonym_prob: float = 0.5,
                      word_dropout: float = 0.15, filler_prob: float = 0.1, unk_token: str = "<unk>"
                      ) -> list[QARecord]:
    """Extra positives for the gate head of a request: ``n`` word-level rewordings of each record (synonym swaps,
    word dropout to ``unk_token`` or removal, filler words; the entity's name is kept; ``teach.augment_question``),
    so that the head accepts wordings it never saw. ``uid = "aug<j>#<uid>"``. Deterministic for a seed."""
    import dataclasses
    import random

    from lumoe_engine.model.teach import TeachConfig, augment_question

    cfg = TeachConfig(synonym_prob=synonym_prob, word_dropout=word_dropout, filler_prob=filler_prob)
    rng = random.Random(seed)
    return [dataclasses.replace(r, uid=f"aug{j}#{r.uid}",
                                question=augment_question(r.question, r.entity, rng, cfg, unk_token))
            for r in records for j in range(n)]
