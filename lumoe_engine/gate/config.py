"""The gate's configuration: one dataclass (``GateConfig``) with the production defaults, named presets and
validation, used by the stream, the store, ``gate-eval`` and the benchmarks alike.

    cfg = GateConfig()                       # the defaults below
    cfg = gate_preset("strict")              # a named preset
    gate = Gate.from_config(cfg, model)      # a Gate at the resolved layer, widths from the model

What it holds:

- where the gate reads: ``layer`` (decoder layer L; None = ``DEFAULT_LAYER`` on a small language model of at most
  8 layers, the middle of a larger one, as the large-model presets; experts act on the layers above L) and
  ``pooling`` (``features.POOLINGS``);
- the heads: ``head`` ("linear" | "quadratic"), ``target_fpr`` (each head's calibration target), ``seed`` (the
  calibration splits; a stream sets it to the run's seed);
- the similarity bound of queries without an image: ``similarity`` (None = off), ``n_protos``, ``sim_quantile``,
  ``bound_dim``;
- the channels: ``names`` (a prompt naming a forgotten entity goes to its expert), ``recognition`` (the answer
  channel: a query with a picture goes by the frozen base's own answer to it, the names it says and the request's
  facts it states: ``gate.recognition``; needs ``names``) and ``image`` (the nearest stored picture, the "lookup"
  preset; off by default), ``image_slack``;
- how a request's gate training set is built (the recipe): ``augment`` reworded copies of each forget query as
  positives, ``sub_heads`` (one sub-head per entity of a request forgetting several), ``counterfactuals`` (its
  images asked other classes' questions and the reverse, as negatives).

Where the defaults come from (the taught embedded default, world v1, word tokenizer; chosen on a validation split
of that world, then checked on its test sets — the measurements, quoted from the gate evaluation):
layer 1, ``mean_last`` (layer 2 was no better and would leave one decoder layer to the experts); linear heads
(quadratic alike, ~2.6 ms per route with the bound); the bound at 0.9 with 64 prototypes (0.85: never-requested
false positives 0.095 / 0.023; 16 prototypes 0.089 / 0.112); no counterfactual negatives (they cost 4-5 points of
recall); two reworded positives per query; the name channel (text-only held-out wordings routed 0.61 -> 1.0); the
image channel (held-out wordings with an image 0.53 -> 0.97). ``target_fpr`` 0.005 for a stream or a store;
``gate-eval`` measures at 0.001 (preset "strict"). On world v2 (scenes) a stored picture no longer identifies a new
one, so the default routes pictures by the answer channel instead (``gate-eval``'s ablations give both, per seed).

Letters: D feature width, H hidden size of the language model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from lumoe_engine.gate.features import POOLINGS

DEFAULT_LAYER = 1          # the tiny LLaVA's measured gate layer (module docstring)
SMALL_LM_LAYERS = 8        # a language model of at most this many layers uses DEFAULT_LAYER; a larger one its middle
HEADS = ("linear", "quadratic")


@dataclass
class GateConfig:
    """How the gate is built and how each request's gate head is trained (module docstring for every field)."""

    layer: Optional[int] = None
    pooling: str = "mean_last"
    head: str = "linear"
    target_fpr: float = 0.005
    seed: int = 0
    similarity: Optional[float] = 0.9
    n_protos: int = 64
    sim_quantile: Optional[float] = 0.02
    bound_dim: Optional[int] = 128
    names: bool = True
    recognition: bool = True
    image: bool = False
    image_slack: float = 1.0
    augment: int = 2
    sub_heads: bool = True
    counterfactuals: bool = False

    def validate(self) -> "GateConfig":
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 0):
            raise ValueError(f"gate layer {self.layer!r}: expected an int >= 0 (a decoder layer) or None (automatic)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"gate pooling {self.pooling!r}: expected one of {POOLINGS}")
        if self.head not in HEADS:
            raise ValueError(f"gate head {self.head!r}: expected one of {HEADS}")
        if not 0.0 <= float(self.target_fpr) < 1.0:
            raise ValueError(f"--target-fpr {self.target_fpr!r}: expected a rate in [0, 1), e.g. 0.005")
        if self.similarity is not None and not -1.0 <= float(self.similarity) <= 1.0:
            raise ValueError(f"gate similarity {self.similarity!r}: expected a cosine in [-1, 1] or None (no bound)")
        if isinstance(self.n_protos, bool) or not isinstance(self.n_protos, int) or self.n_protos < 1:
            raise ValueError(f"gate n_protos {self.n_protos!r}: expected an int >= 1")
        if isinstance(self.augment, bool) or not isinstance(self.augment, int) or self.augment < 0:
            raise ValueError(f"gate augment {self.augment!r}: expected an int >= 0 (reworded copies per query)")
        if not float(self.image_slack) > 0:
            raise ValueError(f"gate image_slack {self.image_slack!r}: expected > 0")
        return self

    # ------------------------------------------------------------------------------------------------ layer
    def resolve_layer(self, n_layers: int) -> int:
        """The gate layer for a language model of ``n_layers`` decoder layers (``layer``, else the default rule);
        ValueError unless 0 <= L < n_layers - 1 (experts go on the layers above L)."""
        layer = self.layer
        if layer is None:
            layer = min(DEFAULT_LAYER, n_layers - 2) if n_layers <= SMALL_LM_LAYERS else n_layers // 2 - 1
        if not 0 <= layer < n_layers - 1:
            raise ValueError(f"--gate-layer {layer}: expected 0..{n_layers - 2} (experts go on the layers above it)")
        return layer

    def gate_kwargs(self) -> dict:
        """The keyword arguments of ``Gate`` this configuration sets (layer and widths come from the model)."""
        return dict(pooling=self.pooling, head=self.head, target_fpr=float(self.target_fpr), seed=int(self.seed),
                    similarity=self.similarity, n_protos=self.n_protos, sim_quantile=self.sim_quantile,
                    bound_dim=self.bound_dim, image_slack=float(self.image_slack),
                    recognition=bool(self.recognition and self.names))  # the answer channel matches names

    # ------------------------------------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "gate") -> "GateConfig":
        """A configuration from a saved dict (a store's ``store.json``, a run's ``config.json``): unknown keys are an
        error naming them; a None value keeps the default (older files wrote None for "the default")."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"{where}: expected an object of gate settings, got {type(doc).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - fields)
        if unknown:
            raise ValueError(f"{where}: unknown gate setting(s) {unknown}; known: {sorted(fields)}")
        nullable = {"layer", "similarity", "sim_quantile", "bound_dim"}
        kw = {k: v for k, v in doc.items() if v is not None or k in nullable}
        return cls(**kw).validate()


# named presets: "default" (a stream or a store), "strict" (what gate-eval measures: target_fpr 0.001), "lookup"
# (pictures by the nearest stored picture instead of the answer channel: the gate before it), "features" (the heads
# and the similarity bound alone, no name, answer or image channel: the ablation)
GATE_PRESETS: dict[str, GateConfig] = {
    "default": GateConfig(),
    "strict": GateConfig(target_fpr=0.001),
    "lookup": GateConfig(recognition=False, image=True),
    "features": GateConfig(names=False, recognition=False, image=False),
}


def gate_preset(name: str, **overrides) -> GateConfig:
    """A copy of preset ``name`` with ``overrides`` applied (validated)."""
    if name not in GATE_PRESETS:
        raise ValueError(f"--gate-preset {name!r}: expected one of {sorted(GATE_PRESETS)}")
    return dataclasses.replace(GATE_PRESETS[name], **overrides).validate()


__all__ = ["GateConfig", "GATE_PRESETS", "gate_preset", "DEFAULT_LAYER", "HEADS"]
