"""The stream under the ``deepspeed`` launcher: 2 CPU ranks (gloo, ZeRO-2, torch AdamW) train each expert on their
shards of the batch; rank 0 alone writes one bank, one gate and one metrics file.

Runs ``deepspeed --num_gpus 2 lumoe_engine/run.py`` as a subprocess on the micro LLaVA and the tiny synthetic
benchmark (stream "ab": 2 requests, 3 steps each). About 1.5-2 minutes on 2 shared CPU cores, most of it process start,
``import deepspeed`` and ``deepspeed.initialize`` per request.
"""
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lumoe_engine.eval.metrics import read_rows

pytest.importorskip("deepspeed")
LAUNCHER = Path(sys.executable).with_name("deepspeed")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not LAUNCHER.exists() and shutil.which("deepspeed") is None, reason="no deepspeed launcher")
def test_two_cpu_ranks_one_bank_one_metrics_file(tmp_path):
    launcher = str(LAUNCHER) if LAUNCHER.exists() else shutil.which("deepspeed")
    out = tmp_path / "out"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(_free_port()), str(ROOT / "lumoe_engine" / "run.py"),
           "--parallel", "data",
           "--stream", "ab", "--synthetic", "tiny", "--preset", "micro", "--cache", str(tmp_path / "cache"),
           "--out", str(out), "--steps", "3", "--batch-size", "8", "--max-per-set", "6", "--no-progress",
           "--teach", "max_steps=20", "--teach", "eval_max_records=40", "--teach", "check_every=1000"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "dist_world_size=2" in log

    # one bank, one gate, one metrics file, written by rank 0 alone
    manifest = json.loads((out / "bank" / "manifest.json").read_text())
    assert [e["id"] for e in manifest["experts"]] == ["taskA", "taskB"]
    for e in manifest["experts"]:
        assert e["metadata"]["world_size"] == 2 and e["metadata"]["deepspeed"] is True
    assert json.loads((out / "gate" / "gate.json").read_text())["expert_ids"] == ["taskA", "taskB"]
    rows = read_rows(out / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert sorted(set(steps)) == [0, 1]
    assert len(rows) == len({(r["step"], r["request"], r["set"], r["data"], r["form"]) for r in rows})  # no duplicates
    assert sorted(p.name for p in out.glob("metrics*")) == ["metrics.jsonl"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["world_size"] == 2
    assert summary["methods"]["lumoe"]["failures"] == []
    assert not list(tmp_path.glob("lumoe-rank*"))  # the other rank left nothing behind

    # the two ranks together trained exactly what one process trains on the whole batch (gradients averaged over
    # equal shards = the full batch's mean; the same clipping and AdamW)
    from lumoe_engine.model.bank import ExpertBank
    from lumoe_engine.model.teach import load_data, teach
    from lumoe_engine.gate.gate import Gate
    from lumoe_engine.stream import StreamConfig
    from lumoe_engine.model.multilora import wrap_model
    from lumoe_engine.unlearn.trainer import train_expert

    cfg = StreamConfig(synthetic="tiny", preset="micro", cache=str(tmp_path / "cache"), steps=3, batch_size=8,
                       progress=False, teach_overrides={"max_steps": 20, "eval_max_records": 40, "check_every": 1000})
    model, processor, _ = teach(cfg.teach_config(), tmp_path / "plain", tmp_path / "cache", progress=False)
    assert _["cached"]
    bench = load_data(cfg.teach_config(), tmp_path / "cache")
    model.requires_grad_(False)
    gate = Gate.from_config(cfg.gate_config(), model)
    n_layers = len(model.model.language_model.layers)
    ctx = wrap_model(model, ExpertBank(None), layers=range(gate.layer + 1, n_layers))
    from lumoe_engine.stream.base import stream_setup

    request = stream_setup(dataclasses.replace(cfg, stream="ab"), bench, processor, evaluate=False)[3][0]
    plain, _ = train_expert(model, processor, ctx, request, cfg.loss_config(),
                            cfg.train_config(), use_deepspeed=False)
    ds = ExpertBank.open(out / "bank").get("taskA")
    worst = max(float((plain.weights[m][i] - ds.weights[m][i]).abs().max()) for m in plain.weights for i in (0, 1))
    scale = max(float(plain.weights[m][1].abs().max()) for m in plain.weights)
    print(f"2-rank DeepSpeed expert vs 1-process expert: max |diff| {worst:.2e} (|B| max {scale:.2e})")
    assert scale > 0 and worst <= 1e-4 * max(1.0, scale) + 1e-6


def _steps_seconds(out) -> float:
    return sum(json.loads(f.read_text())["cost"]["seconds"] for f in sorted((out / "steps" / "lumoe").glob("*.json")))


@pytest.mark.skipif(not LAUNCHER.exists() and shutil.which("deepspeed") is None, reason="no deepspeed launcher")
def test_request_parallel_two_ranks_give_the_single_process_experts(tmp_path):
    """``--parallel requests``: 2 CPU ranks train 2 requests at once (each alone, nothing all-reduced); rank 0 banks
    and gates them in ledger order. The experts (files byte for byte), the gate and the ledger's order equal those of
    one process with the same seeds and ``--threads 1``."""
    launcher = str(LAUNCHER) if LAUNCHER.exists() else shutil.which("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    common = ["--stream", "synthetic:4", "--synthetic", "tiny", "--preset", "micro", "--cache", str(tmp_path / "cache"),
              "--steps", "3", "--batch-size", "8", "--max-per-set", "4", "--no-progress", "--threads", "1",
              "--teach", "max_steps=20", "--teach", "eval_max_records=40", "--teach", "check_every=1000"]
    run_py = str(ROOT / "lumoe_engine" / "run.py")
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run([sys.executable, run_py, *common, "--out", str(one)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(_free_port()), run_py, *common,
                           "--parallel", "requests", "--out", str(two)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "dist_world_size=2" in log

    m1, m2 = (json.loads((d / "bank" / "manifest.json").read_text())["experts"] for d in (one, two))
    assert [e["id"] for e in m1] == [e["id"] for e in m2] and len(m1) == 4
    for a, b in zip(m1, m2):
        assert a["sha256"] == b["sha256"], f"expert {a['id']}: 2-rank bytes differ from the single process's"
        assert (one / "bank" / "experts" / a["file"]).read_bytes() == (two / "bank" / "experts" / b["file"]).read_bytes()
        assert b["metadata"]["world_size"] == 1 and b["metadata"]["deepspeed"] is False  # each trained alone
    g1, g2 = (json.loads((d / "gate" / "gate.json").read_text()) for d in (one, two))
    assert g1["expert_ids"] == g2["expert_ids"] and g1["sha256"] == g2["sha256"]
    s2 = json.loads((two / "summary.json").read_text())["methods"]["lumoe"]
    assert s2["failures"] == [] and s2["parallel"]["mode"] == "requests" and s2["parallel"]["world_size"] == 2
    assert [w["requests"] for w in s2["parallel"]["waves"]] == [[e["id"] for e in m1[:2]], [e["id"] for e in m1[2:]]]
    # every rank's model, bank, gate and new LoRA parameters on that rank's device
    assert [p["local_rank"] for p in s2["placement"]] == [0, 1] and all(p["ok"] for p in s2["placement"])
    assert all(p["device"] == "cpu" and p["lora_dtype"] == ["float32"] for p in s2["placement"])
    # the ledger went through the same events in the same order
    from lumoe_engine.ledger import Ledger

    def events(d):
        led = Ledger(d / "ledger", readonly=True)
        try:
            return [(e["request"], e["state"]) for e in led.events()]
        finally:
            led.close()

    assert events(one) == events(two)
    print(f"steps: 1 process {_steps_seconds(one):.1f} s, 2 ranks {_steps_seconds(two):.1f} s")
