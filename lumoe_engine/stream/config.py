"""The stream's configuration: ``StreamConfig`` (everything a stream run depends on, saved as ``config.json``) and the
methods it can run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lumoe_engine.eval.metrics import DEFAULT_MAX_PER_SET
from lumoe_engine.gate.config import GateConfig
from lumoe_engine.unlearn.baselines import BASELINES
from lumoe_engine.unlearn.losses import LOSSES, LossConfig
from lumoe_engine.unlearn.trainer import TrainConfig

METHODS = ("lumoe",) + BASELINES
PARALLEL = ("requests", "data")  # how several DeepSpeed ranks share the work (StreamConfig.parallel)
# The LUMoE expert's loss: refusal answers on the request's own queries, no retain term (retain_weight 0). NOTE:
# measured on the taught embedded default, task A, 30 steps, the expert applied to every query: IDK lr 1e-2 leaks
# 0.000 in all four forms; IDK + retain (weight 1) leaks 0.03 / 0.20 / 0.17 (image+text / text-only / paraphrase)
# while keeping 0.5 of never-requested facts; NPO + retain leaks 0.03 / 0.03 / 0.0 and breaks the retain answers
# (0.09). The gate keeps other queries away from an expert, so its own queries are all it must handle, and an expert
# that refuses everything also makes a query routed to the wrong expert leak nothing.
LUMOE_LOSS = "idk"


@dataclass
class StreamConfig:
    """Everything a stream run depends on (saved as config.json next to the results).

    stream: build_stream spec; method: "lumoe" or a baseline; compare: LUMoE then every baseline on the same stream.
    data / subset / synthetic / model / load_in_4bit / preset / cache: the taught base (``TeachConfig``).
    extra_eval: further MLUBench-format QA files (or folders of them), scored as the paraphrase form.
    max_per_set: evaluation queries per set per request; eval_batch_size, max_new_tokens (0 = teach's).
    steps / rank / alpha / batch_size: the budget of every request, the same for every method; lr: LUMoE's expert
        learning rate; baseline_lr: the baselines' (NOTE: at LUMoE's 1e-2 every baseline falls to retain ratio 0.0
        after the first request on the embedded default; at 1e-3 they trade forgetting against retain; 2e-4 forgets
        nothing in 30 steps: measured). 40 steps: at 30, with the gate routing every forget query right, two
        text-only queries of task A (seed 0) still answered the first word of a two-word fact ("Lost" for "Lost
        submarine": leak 0.033); at 40 and 60 none leaked (seeds 0 and 1; seed 1 leaked nothing at 30 either).
    loss: LUMoE's expert loss; retain_weight / beta: its LossConfig (the baselines keep the paper's: retain terms on,
        weight 1).
    gate: the gate (``GateConfig``: layer, pooling, heads, channels, the head's data recipe); its seed is the run's.
    gate_negatives: the negatives of a new head besides the forget queries of the requests learned before:
        "stream" = the retain queries of every request of the stream (the operator's retain data, known from the
        start), "seen" = only those of the requests arrived so far. Never-requested entities are never seen.
    threads: torch intra-op threads (None = torch's default; 1 is much faster on a machine shared by several jobs).
    parallel: under the ``deepspeed`` launcher with several ranks, "requests" trains one request per rank at once
        (experts are independent: no gradient is all-reduced; rank 0 banks and gates them in ledger order), "data"
        trains every request on all ranks with ZeRO (a request too large for one device).
    allow_surrogate_images: ``--data`` images that are missing become surrogate pictures (counted in the report);
        without it a missing image is an error naming the files.
    teach_overrides: TeachConfig fields (tests: a short teaching budget).
    resume: continue the run in ``out`` (``steps.check_resumable``: same config but ``RESUME_IGNORED``).
    """

    stream: str = "abcd"
    method: str = "lumoe"
    compare: bool = False
    data: Optional[str] = None
    subset: Optional[int] = None
    synthetic: str = "default"
    model: Optional[str] = None
    load_in_4bit: bool = False
    preset: str = "tiny"
    cache: Optional[str] = None
    extra_eval: list = field(default_factory=list)
    out: str = "runs/default"
    seed: int = 0
    max_per_set: int = DEFAULT_MAX_PER_SET
    eval_batch_size: int = 64
    max_new_tokens: int = 0
    steps: int = 40
    lr: float = 1e-2
    baseline_lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    batch_size: int = 16
    loss: str = LUMOE_LOSS
    retain_weight: float = 0.0
    beta: float = 0.1
    zero_stage: int = 2
    gate: GateConfig = field(default_factory=GateConfig)
    gate_negatives: str = "stream"
    threads: Optional[int] = None
    parallel: str = "requests"
    allow_surrogate_images: bool = False
    teach_overrides: dict = field(default_factory=dict)
    progress: bool = True
    resume: bool = False

    def __post_init__(self):
        if isinstance(self.gate, dict):  # a saved config.json read back
            self.gate = GateConfig.from_dict(self.gate, where="config.json gate")

    def validate(self) -> "StreamConfig":
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: expected one of {METHODS}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss {self.loss!r}: expected one of {sorted(LOSSES)}")
        if isinstance(self.max_per_set, bool) or not isinstance(self.max_per_set, int) or self.max_per_set < 1:
            raise ValueError(f"--max-per-set {self.max_per_set!r}: expected an int >= 1")
        if self.gate_negatives not in ("stream", "seen"):
            raise ValueError(f"--gate-negatives {self.gate_negatives!r}: expected 'stream' or 'seen'")
        if self.parallel not in PARALLEL:
            raise ValueError(f"--parallel {self.parallel!r}: expected one of {PARALLEL}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads {self.threads}: expected >= 1")
        if self.eval_batch_size < 1 or self.max_new_tokens < 0:
            raise ValueError("--eval-batch-size must be >= 1 and --max-new-tokens >= 0")
        for p in self.extra_eval:
            if not Path(p).exists():
                raise FileNotFoundError(f"--extra-eval {p}: no such file or folder; pass MLUBench-format QA JSON "
                                        f"files (lists of {{'image', 'conversations'}} records) or folders of them")
        self.gate.validate()
        self.train_config()
        self.loss_config()
        return self

    def methods(self) -> list[str]:
        return list(METHODS) if self.compare else [self.method]

    def train_config(self, baseline: bool = False) -> TrainConfig:
        return TrainConfig(steps=self.steps, lr=self.baseline_lr if baseline else self.lr, rank=self.rank,
                           alpha=self.alpha,
                           batch_size=self.batch_size, retain_batch_size=self.batch_size, seed=self.seed,
                           zero_stage=self.zero_stage, progress=self.progress).validate()

    def loss_config(self) -> LossConfig:
        return LossConfig(name=self.loss, retain_weight=self.retain_weight, beta=self.beta).validate()

    def gate_config(self) -> GateConfig:
        """The gate's configuration with the run's seed (the calibration splits and the recipe's rewordings)."""
        return dataclasses.replace(self.gate, seed=self.seed).validate()

    def teach_config(self):
        from lumoe_engine.model.teach import TeachConfig

        cfg = TeachConfig(data=self.data, subset=self.subset, synthetic=self.synthetic, model=self.model,
                          load_in_4bit=self.load_in_4bit, preset=self.preset,
                          allow_surrogate_images=self.allow_surrogate_images,
                          model_teaching="none")  # a given checkpoint is used as it is (--teach model_teaching=lora)
        for k, v in self.teach_overrides.items():
            if not hasattr(cfg, k):
                raise ValueError(f"teach_overrides: TeachConfig has no field {k!r}")
            setattr(cfg, k, v)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "StreamConfig":
        """A config from a saved ``config.json`` "config" section (unknown keys, e.g. resolved values, ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


__all__ = ["StreamConfig", "METHODS", "LUMOE_LOSS", "PARALLEL"]
