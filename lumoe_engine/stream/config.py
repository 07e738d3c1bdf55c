"""The stream's configuration: ``StreamConfig`` (everything a stream run depends on, saved as ``config.json``) and the
methods it can run."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lumoe_engine.data.protocol import Protocol
from lumoe_engine.eval.metrics import DEFAULT_MAX_PER_SET
from lumoe_engine.gate.config import GateConfig
from lumoe_engine.unlearn.baselines import BASELINES
from lumoe_engine.unlearn.losses import LOSSES, LossConfig
from lumoe_engine.unlearn.refusal import DEFAULT_REFUSAL
from lumoe_engine.unlearn.trainer import TrainConfig

METHODS = ("lumoe",) + BASELINES
PARALLEL = ("requests", "data")  # how several DeepSpeed ranks share the work (StreamConfig.parallel)
# the frozen hyperparameters (chosen on the development seed by benchmarks/dev_sweep.py; the file says how)
HYPERPARAMETERS_FILE = Path(__file__).with_name("hyperparameters.json")
HYPERPARAMETERS: dict = json.loads(HYPERPARAMETERS_FILE.read_text(encoding="utf-8"))
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
    audit / sweep_every: bounded evaluation for long streams (``eval.metrics.StreamEvaluator``): after request t the
        new request in full plus a seeded sample of at most ``audit`` earlier requests; every request so far after
        every ``sweep_every``-th request and after the last. None (default): every request so far after each one.
    steps / rank / alpha / batch_size: the budget of every request, the same for every method; lr: LUMoE's expert
        learning rate; baseline_lr / baseline_lrs: the baselines'. steps, lr and the baselines' learning rates are
        frozen in hyperparameters.json (chosen on the development seed: benchmarks/dev_sweep.py).
    loss: LUMoE's expert loss; retain_weight / beta: its LossConfig (the baselines keep the paper's: retain terms on,
        weight 1).
    refusal: what a forgotten query answers: the text LUMoE's experts are trained to say (the idk loss's one answer)
        and the judge recognises.
    gate: the gate (``GateConfig``: layer, pooling, heads, channels, the head's data recipe); its seed is the run's.
        A new head's negatives (the protocol): the request's own retain data, the general pool, the request data of
        the requests learned before; never later requests, never test data.
    carry_families / carry_pictures / general_pool: the protocol's split (``data.protocol.Protocol``): what share of
        an entity's taught wordings and pictures a request carries, how many taught general queries the gate may see.
    seed: the whole chain: the synthetic world, the teaching of the base (each seed's base cached), the protocol's
        split, the stream (training, calibration, evaluation samples). ``seeds``: run the chain for each (``--seeds``).
    baseline_lrs: a learning rate per baseline (chosen on the development seed: configs/dev-seed.json); baseline_lr
        for a baseline not listed.
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
    audit: Optional[int] = None
    sweep_every: int = 0
    eval_batch_size: int = 64
    max_new_tokens: int = 0
    steps: int = HYPERPARAMETERS["steps"]
    lr: float = HYPERPARAMETERS["lr"]
    baseline_lr: float = HYPERPARAMETERS["baseline_lr"]
    rank: int = 8
    alpha: float = 16.0
    batch_size: int = 16
    loss: str = LUMOE_LOSS
    retain_weight: float = 0.0
    beta: float = 0.1
    zero_stage: int = 2
    refusal: str = DEFAULT_REFUSAL
    gate: GateConfig = field(default_factory=GateConfig)
    carry_families: float = 0.5
    carry_pictures: float = 0.5
    general_pool: int = 64
    seeds: list = field(default_factory=list)
    baseline_lrs: dict = field(default_factory=lambda: dict(HYPERPARAMETERS["baseline_lrs"]))
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
        if self.audit is not None and (isinstance(self.audit, bool) or not isinstance(self.audit, int)
                                       or self.audit < 0):
            raise ValueError(f"--audit {self.audit!r}: expected an int >= 0 (earlier requests measured after each "
                             f"request), or leave it unset to measure every one")
        if isinstance(self.sweep_every, bool) or not isinstance(self.sweep_every, int) or self.sweep_every < 0:
            raise ValueError(f"--sweep-every {self.sweep_every!r}: expected an int >= 0")
        if self.sweep_every and self.audit is None:
            raise ValueError("--sweep-every needs --audit: without it every request is measured after each one")
        if self.parallel not in PARALLEL:
            raise ValueError(f"--parallel {self.parallel!r}: expected one of {PARALLEL}")
        if not isinstance(self.refusal, str) or not self.refusal.strip():
            raise ValueError(f"--refusal {self.refusal!r}: expected a non-empty text")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"--seeds {self.seeds!r}: expected non-negative ints, e.g. 1,2,3")
        unknown = sorted(set(self.baseline_lrs) - set(BASELINES))
        if unknown:
            raise ValueError(f"baseline_lrs: unknown baseline(s) {unknown}; expected some of {BASELINES}")
        self.protocol()
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

    def evaluation_options(self) -> dict:
        """The ``StreamEvaluator`` keywords this run's evaluation depends on (every evaluator of a run uses them)."""
        return {"max_per_set": self.max_per_set, "seed": self.seed, "refusal": self.refusal, "audit": self.audit,
                "sweep_every": self.sweep_every}

    def protocol(self) -> Protocol:
        """The protocol's split of request data and test data, seeded by the run's seed."""
        return Protocol(carry_families=self.carry_families, carry_pictures=self.carry_pictures,
                        general_pool=self.general_pool, seed=self.seed).validate()

    def baseline_lr_of(self, method: str) -> float:
        return float(self.baseline_lrs.get(method, self.baseline_lr))

    def train_config(self, baseline: bool = False, method: str = "") -> TrainConfig:
        lr = self.baseline_lr_of(method) if baseline else self.lr
        return TrainConfig(steps=self.steps, lr=lr, rank=self.rank,
                           alpha=self.alpha,
                           batch_size=self.batch_size, retain_batch_size=self.batch_size, seed=self.seed,
                           zero_stage=self.zero_stage, progress=self.progress).validate()

    def loss_config(self) -> LossConfig:
        """LUMoE's expert loss: the idk losses answer ``refusal``."""
        return LossConfig(name=self.loss, retain_weight=self.retain_weight, beta=self.beta,
                          refusal=self.refusal).validate()

    def gate_config(self) -> GateConfig:
        """The gate's configuration with the run's seed (the calibration splits and the recipe's rewordings)."""
        return dataclasses.replace(self.gate, seed=self.seed).validate()

    def teach_config(self):
        from lumoe_engine.model.teach import TeachConfig

        cfg = TeachConfig(data=self.data, subset=self.subset, synthetic=self.synthetic, model=self.model,
                          load_in_4bit=self.load_in_4bit, preset=self.preset, seed=self.seed,
                          allow_surrogate_images=self.allow_surrogate_images,
                          model_teaching="none",  # a given checkpoint is used as it is (--teach model_teaching=lora)
                          refusal=self.refusal)  # the tiny base is taught to say the refusal about what it does not know
        if not self.data:  # the embedded default: the seed draws the world too
            cfg.synthetic_overrides = {"seed": self.seed}
        for k, v in self.teach_overrides.items():
            if not hasattr(cfg, k):
                raise ValueError(f"teach_overrides: TeachConfig has no field {k!r}")
            if k == "synthetic_overrides" and isinstance(v, dict):
                v = {**cfg.synthetic_overrides, **v}
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
