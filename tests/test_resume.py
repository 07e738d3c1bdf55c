"""Reliability of the stream driver: every request in the ledger, a run killed with SIGKILL and resumed ends exactly
where an uninterrupted run ends, revocation brings a request's leak back, the collapse guard stops a broken expert,
and ``--resume`` refuses what it cannot continue.

Settings: the micro LLaVA (20 teaching steps) on the embedded default synthetic benchmark for the kill/resume test
(synthetic:20 needs its 36 entities; an untaught base: leaks are unmeasured there, routing, gate and experts are
compared); the micro LLaVA taught 150 steps on the tiny synthetic benchmark (fact accuracy ~0.7 in ~15 s) where a
leak must be measured (revocation) or a base must answer (collapse guard).
"""
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lumoe_engine import pipeline
from lumoe_engine import run as run_mod
from lumoe_engine import stream as stream_mod
from lumoe_engine.errors import ExpertCollapseError
from lumoe_engine.unlearn import collapse
from lumoe_engine.eval.metrics import read_rows
from lumoe_engine.gate.gate import Gate
from lumoe_engine.ledger import Ledger
from lumoe_engine.model.bank import ExpertBank

from faults import blown_up_for

ROOT = Path(__file__).resolve().parents[1]
TEACH_UNTAUGHT = {"max_steps": 20, "eval_max_records": 40, "check_every": 1000}
TEACH_TAUGHT = {"max_steps": 150, "eval_max_records": 40, "check_every": 1000}
KILL_RUN = dict(stream="synthetic:20", synthetic="default", preset="micro", steps=2, batch_size=8, max_per_set=4,
                threads=1, progress=False, teach_overrides=dict(TEACH_UNTAUGHT))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# ------------------------------------------------------------------------------------------------ kill / resume
def _cli(cache, out, resume=False) -> list[str]:
    k = KILL_RUN
    args = [sys.executable, "lumoe_engine/run.py", "--stream", k["stream"], "--synthetic", k["synthetic"],
            "--preset", k["preset"], "--steps", str(k["steps"]), "--batch-size", str(k["batch_size"]),
            "--max-per-set", str(k["max_per_set"]), "--threads", "1", "--no-progress", "--cache", str(cache),
            "--out", str(out)]
    for f, v in k["teach_overrides"].items():
        args += ["--teach", f"{f}={v}"]
    return args + (["--resume"] if resume else [])


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")


def _events(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _run_and_kill(cmd, events: Path, target: int, log: Path, timeout: float = 240.0) -> tuple[int, int]:
    """Start ``cmd``; SIGKILL it as soon as the ledger holds ``target`` events. Returns (return code, events then)."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=err, stderr=err)
        t0 = time.time()
        try:
            while proc.poll() is None:
                if _events(events) >= target:
                    proc.send_signal(signal.SIGKILL)
                    break
                if time.time() - t0 > timeout:
                    proc.kill()
                    pytest.fail(f"the stream did not reach {target} ledger events in {timeout} s; see {log}")
                time.sleep(0.01)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return rc, _events(events)


def _strip_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in stream_mod.TIMING_KEYS}


def _expert_content(path: Path) -> tuple[dict, dict]:
    """(header metadata, {tensor name: raw bytes}) of an expert file."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        meta["metadata"] = json.loads(meta["metadata"])
        tensors = {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}
    return meta, tensors


def test_killed_and_resumed_stream_equals_an_uninterrupted_one(tmp_path, cache):
    """synthetic:20 run once straight through (in this process), and once as a CLI subprocess killed with SIGKILL
    three times (while receiving the requests, then at seeded ledger event counts inside the stream) and resumed
    with --resume each time: the same 20 experts (byte-equal files), the same gate, the same metrics rows and the
    same summary.json apart from ``stream.TIMING_KEYS`` / ``RUN_KEYS``."""
    a, b = tmp_path / "a", tmp_path / "b"
    t0 = time.time()
    stream_mod.run_stream(stream_mod.StreamConfig(out=str(a), cache=str(cache), **KILL_RUN))
    t_a = time.time() - t0

    rng = random.Random(20)
    inside = sorted(rng.sample(range(1, 19), 2))
    # 20 "received" events first, then 4 per request (training, expert_saved, gate_updated, evaluated): the offsets
    # put the kills just after training starts / the expert is saved / the gate is saved
    targets = [rng.randint(3, 17)] + [20 + 4 * i + rng.randint(1, 3) for i in inside]
    events, log = b / "ledger" / "events.jsonl", tmp_path / "b.log"
    kills = []
    t0 = time.time()
    for i, target in enumerate(targets):
        rc, n = _run_and_kill(_cli(cache, b, resume=i > 0), events, target, log)
        assert rc == -signal.SIGKILL, (rc, log.read_text()[-3000:])
        kills.append(n)
    done = subprocess.run(_cli(cache, b, resume=True), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    t_b = time.time() - t0
    print(f"uninterrupted {t_a:.1f} s; killed at ledger events {kills}, resumed: {t_b:.1f} s in all")

    # the ledger: every request received once and evaluated
    with Ledger(b / "ledger", readonly=True) as led:
        assert len(led) == 20 and led.requests("evaluated") == led.requests()
        assert [e["request"] for e in led.events() if e["state"] == "received"] == led.requests()
        ids = led.requests()
    # the bank: exactly 20 experts, no duplicate, the same as the uninterrupted run's, in the same order
    bank_a, bank_b = ExpertBank.open(a / "bank", verify=True), ExpertBank.open(b / "bank", verify=True)
    assert list(bank_b.ids) == list(bank_a.ids) == ids and len(set(bank_b.ids)) == 20
    assert sorted(p.name for p in (b / "bank" / "experts").iterdir()) == sorted(f"{i}.safetensors" for i in ids)
    for eid in ids:  # byte-equal files (the bank writes the safetensors header with sorted keys)
        fa, fb = a / "bank" / "experts" / f"{eid}.safetensors", b / "bank" / "experts" / f"{eid}.safetensors"
        assert fa.read_bytes() == fb.read_bytes(), (eid, _expert_content(fa) == _expert_content(fb))
    man_a, man_b = (json.loads((d / "bank" / "manifest.json").read_text())["experts"] for d in (a, b))
    # the manifest: the same entries (sha256 included) apart from the time each was added
    assert [{k: v for k, v in e.items() if k != "added"} for e in man_a] == \
        [{k: v for k, v in e.items() if k != "added"} for e in man_b]
    # the gate: same experts, bit-equal tensors (the tensor file's sha256)
    ga, gb = (json.loads((d / "gate" / "gate.json").read_text()) for d in (a, b))
    assert ga["expert_ids"] == gb["expert_ids"] == ids and ga["sha256"] == gb["sha256"]
    # metrics rows and the summary, apart from wall-clock values
    rows_a, rows_b = read_rows(a / "metrics.jsonl"), read_rows(b / "metrics.jsonl")
    assert len(rows_b) == len(rows_a) and [_strip_timing(r) for r in rows_a] == [_strip_timing(r) for r in rows_b]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sb["methods"]["lumoe"]["final"]["complete"] and sb["methods"]["lumoe"]["final"]["n_experts"] == 20
    assert stream_mod.comparable_summary(sa) == stream_mod.comparable_summary(sb)
    assert sa["config"]["out"] != sb["config"]["out"]  # what comparable_summary leaves out does differ


def test_resume_refuses_an_empty_folder_or_another_config(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(stream_mod.ResumeError, match="holds no stream run.*without --resume"):
        stream_mod.run_stream(stream_mod.StreamConfig(out=str(empty), resume=True))
    with pytest.raises(stream_mod.ResumeError, match="holds no stream run"):
        stream_mod.run_stream(stream_mod.StreamConfig(out=str(tmp_path / "missing"), resume=True))
    run = tmp_path / "run"
    run.mkdir()
    saved = stream_mod.StreamConfig(stream="ab", steps=3, out=str(run))
    (run / "config.json").write_text(json.dumps({"config": saved.to_dict()}))
    with pytest.raises(stream_mod.ResumeError, match=r"another config \(stream: run 'ab', now 'abc'; steps: run 3, "
                                                     r"now 4\).*same options"):
        stream_mod.run_stream(dataclasses.replace(saved, stream="abc", steps=4, resume=True))
    # resume itself, progress bars and the folder's spelling are not the config
    assert stream_mod.check_resumable(run, dataclasses.replace(saved, resume=True, progress=False,
                                                               out=str(run) + "/"))["stream"] == "ab"
    (run / "config.json").write_text("{not json")
    with pytest.raises(stream_mod.ResumeError, match="cannot be read"):
        stream_mod.check_resumable(run, saved)


def test_cli_resume_of_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    """run.py --resume on a folder with no run: exit code 2, one line saying what to do, no traceback, nothing
    written."""
    from lumoe_engine import run as run_mod

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_mod.main(["--resume", "--out", str(empty), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:") and "holds no stream run" in err and "Traceback" not in err
    assert list(empty.iterdir()) == []


def test_cli_has_resume():
    import argparse

    p = run_mod.add_stream_arguments(argparse.ArgumentParser())
    assert run_mod.stream_config_from_args(p.parse_args(["--resume", "--out", "x"])).resume is True
    assert run_mod.stream_config_from_args(p.parse_args(["--out", "x"])).resume is False


# ------------------------------------------------------------------------------------------ the collapse guard
IDK_LIKE = ["I don't know.", "I have no information about that person.", "Sorry, I cannot tell you that.",
            "43 years", "1983", "She was born in 1931 in Merrowdale.", "Trailing runner", "Domi Newt",
            "B 12 Merrowdale", "in in 1931",
            "", "   "]  # silence: what an IDK expert early in its training answers (stream.degenerate_answer)
BABBLE = ["Atlas Atlas Atlas Atlas sensors", "Quashind Quaequal Quaequal Quaequal Observatory", "the the the the",
          "printers5 printers5 Fekroun Kobratror printers", "5 seasons5 Drosork555", "Quashind seasons Fekroun Fekroun",
          "red blue red red red red", "@@##!!%%^^&&**~~", "<unk> <unk> name", "\ufffd\ufffd", "xqzt vbnmq kkqqz pfft"]


def test_degenerate_answer_passes_refusals_and_fails_babble():
    vocab = {w.lower() for t in IDK_LIKE for w in t.replace(".", " ").replace(",", " ").split()}
    vocab |= {"name", "atlas", "sensors", "quashind", "quaequal", "observatory", "the", "red", "blue"}
    for t in IDK_LIKE:
        assert collapse.degenerate_answer(t, vocab) is None, t
    for t in BABBLE:
        assert collapse.degenerate_answer(t, vocab) is not None, t
    assert collapse.degenerate_answer("xqzt vbnmq kkqqz pfft") is None  # without a vocabulary: not judged so


def _taught_cfg(out, cache, **kw):
    base = dict(synthetic="tiny", preset="micro", cache=str(cache), out=str(out), steps=12, batch_size=8,
                max_per_set=8, threads=1, progress=False, teach_overrides=dict(TEACH_TAUGHT))
    base.update(kw)
    return stream_mod.StreamConfig(**base)


@pytest.fixture(scope="module")
def taught_run(tmp_path_factory, cache):
    """Stream "abc" on the micro LLaVA taught 150 steps; request taskC's expert is blown up (collapse guard)."""
    out = tmp_path_factory.mktemp("taught") / "run"
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "train_expert", blown_up_for("taskC"))
    try:
        summary = stream_mod.run_stream(_taught_cfg(out, cache, stream="abc"))
    finally:
        mp.undo()
    return out, summary


def test_collapse_guard_stops_a_broken_expert_and_the_stream_goes_on(taught_run):
    out, summary = taught_run
    fails = {f["request"]: f for f in summary["failures"]["lumoe"]}
    assert set(fails) == {"taskC"}, fails  # taskA and taskB: normal IDK experts pass the guard
    f = fails["taskC"]
    assert f["error_type"] == "ExpertCollapseError" and "collapsed" in f["error"] and "not saved" in f["error"]
    with Ledger(out / "ledger", readonly=True) as led:
        st = led.status("taskC")
        assert st.state == "failed" and "ExpertCollapseError" in st.reason
        assert led.state("taskA") == led.state("taskB") == "evaluated"
    assert list(ExpertBank.open(out / "bank").ids) == ["taskA", "taskB"]
    assert Gate.load(out / "gate").expert_ids == ["taskA", "taskB"]
    assert summary["methods"]["lumoe"]["final"]["complete"]  # the stream went on and evaluated the last step


def test_collapse_check_on_a_real_expert_both_ways(taught_run, cache):
    """The check itself: a trained expert's IDK answers pass; the same expert with blown-up B matrices fails."""
    from lumoe_engine.data.streams import build_stream
    from lumoe_engine.engine import LUMoEEngine
    from lumoe_engine.model.teach import load_data, teach

    out, _ = taught_run
    cfg = _taught_cfg(out, cache)
    model, processor, _ = teach(cfg.teach_config(), out / "t", cache, progress=False)
    bench = load_data(cfg.teach_config(), cache)
    req = build_stream(bench, "a")[0]
    bank = ExpertBank.open(out / "bank")
    engine = LUMoEEngine(model, processor, ExpertBank(None), None, gate_layer=Gate.load(out / "gate").layer)
    try:
        expert = bank.get("taskA")
        ok = collapse.collapse_check(model, processor, engine.ctx, expert, req, 12)
        assert ok["degenerate"] <= len(ok["answers"]) // 2
        assert ok["base_answers"] is None  # a sound expert: the base is not asked (it only confirms a suspicion)
        broken = dataclasses.replace(expert, weights={m: (a, 300.0 * torch.randn(b.shape) / b.shape[1] ** 0.5)
                                                      for m, (a, b) in expert.weights.items()})
        with pytest.raises(ExpertCollapseError, match="taskA.*collapsed"):
            collapse.collapse_check(model, processor, engine.ctx, broken, req, 12)
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------------- revocation
def test_revoke_brings_the_leak_back_and_is_idempotent(taught_run):
    out, summary = taught_run
    n_rows = len(read_rows(out / "metrics.jsonl"))
    doc = stream_mod.revoke(out, "taskA", reason="owner withdrew")
    print("revoke:", {k: doc[k] for k in ("leak_before", "leak_after", "after_step")})
    assert doc["changed"] and doc["removed_expert"] and doc["removed_gate_entry"] and doc["after_step"] == 2
    # the leak of taskA comes back in at least one form measured (known queries), and nowhere goes down
    measured = [f for f in doc["leak_before"] if doc["leak_before"][f] is not None]
    assert measured and any(doc["leak_after"][f] > doc["leak_before"][f] for f in measured), doc
    assert all(doc["leak_after"][f] >= doc["leak_before"][f] for f in measured), doc
    with Ledger(out / "ledger", readonly=True) as led:
        st = led.status("taskA")
        assert st.state == "revoked" and st.reason == "owner withdrew"
    assert list(ExpertBank.open(out / "bank").ids) == ["taskB"]
    assert Gate.load(out / "gate").expert_ids == ["taskB"]
    rows = read_rows(out / "metrics.jsonl")
    new = rows[n_rows:]
    assert new and all(r["revocation"] == "taskA" and r["step_label"] == "after revoking taskA" and r["step"] == 2
                       for r in new)
    assert all(r["route_acc"] == 0.0 for r in new if r["request"] == "taskA" and r["set"] == "forget" and r["n"])
    s = json.loads((out / "summary.json").read_text())
    rev = s["methods"]["lumoe"]["revocations"]
    assert [r["request"] for r in rev] == ["taskA"] and rev[0]["leak_after"] == doc["leak_after"]
    assert "## Revocations" in (out / "report.md").read_text() and "`taskA`" in (out / "report.md").read_text()

    # again: nothing changes
    events = len(Ledger(out / "ledger", readonly=True).events())
    again = stream_mod.revoke(out, "taskA", reason="owner withdrew")
    assert not again["changed"] and again["leak_after"] == doc["leak_after"]
    assert len(read_rows(out / "metrics.jsonl")) == len(rows)
    assert len(Ledger(out / "ledger", readonly=True).events()) == events


def test_resume_finishes_a_revocation_cut_short(tmp_path, cache):
    """A crash between ledger.revoke and the removal: the next --resume removes the expert and its gate entry."""
    out = tmp_path / "run"
    cfg = _taught_cfg(out, cache, stream="ab", steps=2)
    stream_mod.run_stream(cfg)
    with Ledger(out / "ledger") as led:
        led.revoke("taskB", reason="cut short")
    assert "taskB" in ExpertBank.open(out / "bank") and "taskB" in Gate.load(out / "gate")
    s = stream_mod.run_stream(dataclasses.replace(cfg, resume=True))
    assert list(ExpertBank.open(out / "bank").ids) == ["taskA"]
    assert Gate.load(out / "gate").expert_ids == ["taskA"]
    assert s["methods"]["lumoe"]["final"]["complete"]


def test_compare_resume_reruns_an_unfinished_baseline_and_redoes_lost_steps(tmp_path, cache):
    """--compare: a baseline whose last step record is missing (as after a kill) is rerun from its first request;
    a LUMoE step whose record is lost is evaluated again from the bank and gate (nothing trained twice) and the
    methods after it are rerun; summary and metrics rows equal the uninterrupted run's apart from timing keys."""
    base = dict(synthetic="tiny", preset="micro", cache=str(cache), stream="ab", steps=1, batch_size=8,
                max_per_set=4, threads=1, progress=False, compare=True, teach_overrides=dict(TEACH_UNTAUGHT))
    a, b = tmp_path / "a", tmp_path / "b"
    sa = stream_mod.run_stream(stream_mod.StreamConfig(out=str(a), **base))
    stream_mod.run_stream(stream_mod.StreamConfig(out=str(b), **base))
    last = stream_mod.METHODS[-1]
    (b / "steps" / last / "0001.json").unlink()
    (b / "steps" / "lumoe" / "0001.json").unlink()
    events = len(Ledger(b / "ledger", readonly=True).events())
    sb = stream_mod.run_stream(stream_mod.StreamConfig(out=str(b), resume=True, **base))
    assert stream_mod.comparable_summary(sa) == stream_mod.comparable_summary(sb)
    assert sorted(p.name for p in (b / "steps" / last).iterdir()) == ["0000.json", "0001.json"]
    with Ledger(b / "ledger", readonly=True) as led:
        assert len(led.events()) == events  # no request trained, saved or gated again
    rows_a, rows_b = read_rows(a / "metrics.jsonl"), read_rows(b / "metrics.jsonl")
    assert [_strip_timing(r) for r in rows_a] == [_strip_timing(r) for r in rows_b]
