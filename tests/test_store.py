"""The request store through its front door, ``python lumoe_engine/run.py submit | process | status | revoke |
verify`` (``run.main(argv)`` in process; one real subprocess): a store of two requests processed on the micro taught
base, a revocation, a failing request (nan loss; a damaged image copy), resume after a crash, and more than twenty
kinds of bad input, each refused with an error naming the file / request / field while every file of the store's
ledger/, bank/ and gate/ stays byte-identical.
"""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from faults import nan_for
from lumoe_engine import run as run_mod
from lumoe_engine import pipeline
from lumoe_engine import store as store_mod
from lumoe_engine.ledger import Ledger
from lumoe_engine.unlearn.trainer import train_expert as real_train_expert

ROOT = Path(__file__).resolve().parents[1]
TEACH = ["--teach", 'synthetic="tiny"', "--teach", 'preset="micro"', "--teach", "max_steps=20",
         "--teach", "eval_max_records=40", "--teach", "check_every=1000"]
# the mechanics of the store, not forgetting: 2 small steps (an expert at the default lr on this barely taught base
# says "I I I ..." and the collapse guard rightly fails it)
FAST = ["--steps", "2", "--lr", "1e-3", "--batch-size", "8", "--threads", "1"]


# ------------------------------------------------------------------------------------------------------ helpers
def cli(capsys, *argv):
    """run.py's main(argv) -> (exit code, stdout, stderr)."""
    rc = run_mod.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return (rc if isinstance(rc, int) else 0), cap.out, cap.err


def snapshot(store: Path) -> dict:
    """sha256 of every file under the store's ledger/, bank/ and gate/ (and store.json)."""
    out = {}
    for sub in ("ledger", "bank", "gate"):
        for p in sorted((store / sub).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(store))] = hashlib.sha256(p.read_bytes()).hexdigest()
    if (store / "store.json").is_file():
        out["store.json"] = hashlib.sha256((store / "store.json").read_bytes()).hexdigest()
    return out


def png(path: Path, color=(200, 30, 30), size=32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def qa(q, a, image=None):
    return {"image": image, "question": q, "answer": a}


R1 = {"id": "r1", "entity": "Vorla Quintessa",
      "forget": [qa("What is this person's name?", "Vorla Quintessa", "vorla.png"),
                 qa("What is Vorla Quintessa's profession?", "She is a glassblower.")],
      "retain": [qa("What is this person's name?", "Mira Sollen", "mira.png"),
                 qa("What is Mira Sollen's profession?", "She is a cartographer.")]}
R2 = {"id": "r2", "entity": "Tomas Elverin",
      "forget": [qa("What is this person's name?", "Tomas Elverin", "tomas.png"),
                 qa("Where was Tomas Elverin born?", "He was born in Harrowgate.")]}


def write_requests(folder: Path, *docs) -> list:
    png(folder / "vorla.png", (200, 30, 30))
    png(folder / "mira.png", (30, 200, 30))
    png(folder / "tomas.png", (30, 30, 200))
    paths = []
    for d in docs:
        p = folder / f"{d.get('id', 'noid')}.json"
        p.write_text(json.dumps(d))
        paths.append(p)
    return paths


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------- the store
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def processed(tmp_path_factory, cache):
    """A store with r1 and r2 submitted and processed on the micro taught base (shared, never modified: copy it)."""
    base = tmp_path_factory.mktemp("processed")
    files = write_requests(base / "in", R1, R2)
    store = base / "store"
    assert run_mod.main(["submit", *map(str, files), "--store", str(store)]) == 0
    rc = run_mod.main(["process", "--store", str(store), "--cache", str(cache), *TEACH, *FAST])
    assert rc == 0
    return store


def test_submit_process_revoke_happy_path(processed, tmp_path, capsys):
    store = copy_store(processed, tmp_path / "store")
    rc, out, err = cli(capsys, "status", "--store", store)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert [ln.split("\t")[:2] for ln in lines] == [["r1", "gate_updated"], ["r2", "gate_updated"]]
    assert all("expert=yes" in ln and "gate=yes" in ln for ln in lines)
    conf = json.loads((store / "store.json").read_text())
    assert conf["model"]["source"] == "taught" and Path(conf["model"]["dir"], "config.json").is_file()
    bank = json.loads((store / "bank" / "manifest.json").read_text())
    assert [e["id"] for e in bank["experts"]] == ["r1", "r2"]
    meta = bank["experts"][0]["metadata"]
    with Ledger(store / "ledger", readonly=True) as led:
        assert meta["content_hash"] == led.status("r1").content_hash
        saved = [e for e in led.events("r1") if e["state"] == "expert_saved"][0]["info"]
        assert saved["bytes"] > 0 and saved["steps"] == 2

    # the same file again: already received, nothing written
    before = snapshot(store)
    rc, out, _ = cli(capsys, "submit", processed.parent / "in" / "r1.json", "--store", store)
    assert rc == 0 and "already received as r1 (state gate_updated)" in out
    assert snapshot(store) == before

    rc, out, err = cli(capsys, "revoke", "r1", "--store", store, "--reason", "owner withdrew")
    assert rc == 0, err
    assert "r1: revoked" in out and "gate entry removed" in out and "expert removed" in out
    bank = json.loads((store / "bank" / "manifest.json").read_text())
    assert [e["id"] for e in bank["experts"]] == ["r2"]
    assert not (store / "bank" / "experts" / "r1.safetensors").exists()
    from lumoe_engine.gate.gate import Gate

    assert Gate.load(store / "gate").expert_ids == ["r2"]
    with Ledger(store / "ledger", readonly=True) as led:
        assert led.state("r1") == "revoked" and led.state("r2") == "gate_updated"
        assert [e["state"] for e in led.events("r1")] == ["received", "training", "expert_saved", "gate_updated",
                                                          "revoked"]
        assert led.status("r1").reason == "owner withdrew"
    # idempotent: revoking again records nothing and changes nothing
    before = snapshot(store)
    rc, out, _ = cli(capsys, "revoke", "r1", "--out", store)
    assert rc == 0 and "already revoked" in out
    assert snapshot(store) == before
    rc, out, _ = cli(capsys, "verify", "--store", store)
    assert rc == 0 and "ok" in out


def test_failing_requests_end_failed_and_leave_bank_and_gate_unchanged(processed, tmp_path, capsys, monkeypatch,
                                                                       cache):
    store = copy_store(processed, tmp_path / "store")
    r3 = {"id": "r3", "forget": [qa("What is Olan Brisk's profession?", "He is a tanner.")]}
    r4 = {"id": "r4", "forget": [qa("What is this place called?", "Quell Harbour", "mira2.png")]}
    png(tmp_path / "in" / "mira2.png", (90, 90, 10))
    files = write_requests(tmp_path / "in", r3, r4)
    rc, out, err = cli(capsys, "submit", *files, "--store", store)
    assert rc == 0, err
    # r4's image copy in the ledger is damaged after it was received (bad data at training time)
    doc = json.loads((store / "ledger" / "requests" / "r4.json").read_text())
    img = store / "ledger" / "images" / Path(doc["forget"][0]["image"]).name
    img.write_bytes(img.read_bytes()[:40])
    bank_before = {k: v for k, v in snapshot(store).items() if k.startswith(("bank", "gate"))}
    monkeypatch.setattr(pipeline, "train_expert", nan_for("r3"))
    rc, out, err = cli(capsys, "process", "--store", store, "--cache", cache, *FAST)
    assert rc == 1, out + err
    assert "r3: failed: NonFiniteLossError" in out and "r4: failed: LedgerCorruptError" in out
    with Ledger(store / "ledger", readonly=True) as led:
        assert led.state("r3") == "failed" and "nan" in led.status("r3").reason
        assert led.state("r4") == "failed" and "r4" in led.status("r4").reason
        assert led.state("r1") == "gate_updated"
    assert {k: v for k, v in snapshot(store).items() if k.startswith(("bank", "gate"))} == bank_before
    rc, out, _ = cli(capsys, "status", "--store", store, "r3")
    assert rc == 0 and out.startswith("r3\tfailed\t") and "NonFiniteLossError" in out


def test_collapsed_expert_fails_its_request_and_leaves_bank_and_gate_unchanged(processed, tmp_path, capsys,
                                                                               monkeypatch, cache):
    """The store path runs the collapse guard on every new expert (the guard itself: test_resume)."""
    from lumoe_engine.errors import ExpertCollapseError

    calls = []

    def guard(model, processor, ctx, expert, request, max_new, **kw):
        calls.append(request.id)
        if request.id == "r5":
            raise ExpertCollapseError(f"request {request.id!r}: the expert collapsed (test); not saved")
        return {"answers": [], "degenerate": 0}

    monkeypatch.setattr(pipeline, "collapse_check", guard)
    store = copy_store(processed, tmp_path / "store")
    files = write_requests(tmp_path / "in", {"id": "r5", "forget": [qa("What is Olan Brisk's trade?", "tanner")]},
                           {"id": "r6", "forget": [qa("Where does Olan Brisk live?", "Quell")]})
    rc, out, err = cli(capsys, "submit", *files, "--store", store)
    assert rc == 0, err
    before = {k: v for k, v in snapshot(store).items() if k.startswith(("bank", "gate"))}
    rc, out, err = cli(capsys, "process", "--store", store, "--cache", cache, *FAST)
    assert rc == 1, out + err
    assert calls == ["r5", "r6"] and "r5: failed: ExpertCollapseError" in out
    with Ledger(store / "ledger", readonly=True) as led:
        assert led.state("r5") == "failed" and "collapsed" in led.status("r5").reason
        assert led.state("r6") == "gate_updated"
    after = {k: v for k, v in snapshot(store).items() if k.startswith(("bank", "gate"))}
    assert after != before  # r6 went in; r5 left nothing: only r6 in the bank
    from lumoe_engine.model.bank import ExpertBank

    assert "r5" not in ExpertBank.open(store / "bank").ids and "r6" in ExpertBank.open(store / "bank").ids


def test_process_resumes_after_a_crash_without_training_twice(processed, tmp_path, capsys, monkeypatch, cache):
    from lumoe_engine.gate.gate import Gate

    store = copy_store(processed, tmp_path / "store")
    r5 = {"id": "r5", "entity": "Olan Brisk", "forget": [qa("What is Olan Brisk's profession?", "He is a tanner.")]}
    rc, _, err = cli(capsys, "submit", *write_requests(tmp_path / "in", r5), "--store", store)
    assert rc == 0, err
    calls = []

    def counting(*a, **kw):
        calls.append(a[3].id)
        return real_train_expert(*a, **kw)

    monkeypatch.setattr(pipeline, "train_expert", counting)
    real_add = Gate.add_expert

    def killed(self, *a, **kw):  # the process dies after the expert is saved, before the gate entry
        raise KeyboardInterrupt

    monkeypatch.setattr(Gate, "add_expert", killed)
    with pytest.raises(KeyboardInterrupt):
        run_mod.main(["process", "--store", str(store), "--cache", str(cache), *FAST])
    capsys.readouterr()
    with Ledger(store / "ledger", readonly=True) as led:
        assert led.state("r5") == "expert_saved"
    assert calls == ["r5"]
    monkeypatch.setattr(Gate, "add_expert", real_add)
    rc, out, err = cli(capsys, "process", "--store", store, "--cache", cache, *FAST)
    assert rc == 0, out + err
    assert "r5: expert already in the bank" in out and calls == ["r5"]  # not trained again
    bank = json.loads((store / "bank" / "manifest.json").read_text())
    assert [e["id"] for e in bank["experts"]] == ["r1", "r2", "r5"]
    assert Gate.load(store / "gate").expert_ids == ["r1", "r2", "r5"]
    with Ledger(store / "ledger", readonly=True) as led:
        assert [e["state"] for e in led.events("r5")] == ["received", "training", "expert_saved", "gate_updated"]
    # a further run has nothing to do and changes nothing
    before = snapshot(store)
    rc, out, _ = cli(capsys, "process", "--store", store, "--cache", cache, *FAST)
    assert rc == 0 and "nothing to process" in out and snapshot(store) == before


def test_revocation_interrupted_before_the_removal_is_finished_by_process(processed, tmp_path, capsys, cache):
    store = copy_store(processed, tmp_path / "store")
    with Ledger(store / "ledger") as led:  # a crash right after the ledger event: expert and gate entry remain
        led.revoke("r2", reason="owner withdrew")
    rc, out, _ = cli(capsys, "verify", "--store", store)
    assert rc == 1 and "'r2' is still in the bank" in out
    rc, out, err = cli(capsys, "process", "--store", store, "--cache", cache, *FAST)
    assert rc == 0, err
    assert "r2: gate entry removed (revoked)" in out and "r2: expert removed (revoked)" in out
    rc, out, _ = cli(capsys, "verify", "--store", store)
    assert rc == 0, out


def test_watch_submits_new_and_changed_files_only(processed, tmp_path, capsys):
    store = store_mod.Store(copy_store(processed, tmp_path / "store"))
    folder = tmp_path / "drop"
    write_requests(folder, R1)
    (folder / "half.json").write_text('{"forget": [')  # caught half-written
    lines, passes = [], []

    def sleep(_):
        passes.append(1)
        if len(passes) == 1:
            write_requests(folder, {"id": "r6", "forget": [qa("Who is Pell Arno?", "A ferryman.")]})
            (folder / "half.json").write_text(json.dumps({"id": "r7", "forget": [qa("Who is Ida Venn?", "A potter.")]}))
        else:
            raise KeyboardInterrupt

    store_mod.watch(store, folder, interval=0.01, out=lines.append, sleep=sleep)
    assert any(ln.endswith("r1.json: already received as r1 (state gate_updated)") for ln in lines)
    assert any(ln.startswith(f"error: {folder / 'half.json'}:") and "invalid JSON" in ln for ln in lines)
    assert any(ln.endswith("r6.json: received as r6") for ln in lines)
    assert any(ln.endswith("half.json: received as r7") for ln in lines)
    assert sum("r1.json" in ln for ln in lines) == 1  # unchanged files are not submitted again
    assert lines[-1] == "watch: stopped"
    rc, out, err = cli(capsys, "submit", "--watch", folder, "--once", "--store", store.root)
    assert rc == 0, err
    assert "already received as r6" in out and "already received as r7" in out


def test_revoke_in_a_stream_run_directory(tmp_path, capsys, cache):
    from lumoe_engine import stream as stream_mod
    from lumoe_engine.gate.gate import Gate

    out = tmp_path / "run"
    teach = {"max_steps": 20, "eval_max_records": 40, "check_every": 1000}
    stream_mod.run_stream(stream_mod.StreamConfig(synthetic="tiny", preset="micro", cache=str(cache), out=str(out),
                                                  stream="a", steps=1, batch_size=8, max_per_set=4, progress=False,
                                                  teach_overrides=teach, threads=1))
    capsys.readouterr()
    before = snapshot(out)
    rc, _, err = cli(capsys, "revoke", "nope", "--out", out)
    assert rc == 2 and "unknown request id 'nope'" in err and "nothing was changed" in err
    assert snapshot(out) == before
    rc, text, err = cli(capsys, "revoke", "taskA", "--out", out, "--reason", "owner withdrew")
    assert rc == 0, err
    assert f"taskA: revoked in the stream run {out} (expert removed: True, gate entry removed: True)" in text
    assert json.loads((out / "bank" / "manifest.json").read_text())["experts"] == []
    assert Gate.load(out / "gate").expert_ids == []
    with Ledger(out / "ledger", readonly=True) as led:
        assert led.state("taskA") == "revoked"
    rc, text, _ = cli(capsys, "revoke", "taskA", "--out", out)
    assert rc == 0 and "taskA: already revoked" in text


def test_real_entry_point(processed, tmp_path):
    store = copy_store(processed, tmp_path / "store")
    bad = tmp_path / "bad.json"
    bad.write_text('{"id": "r9", "forget": [], "retain": []}')
    before = snapshot(store)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "lumoe_engine" / "run.py"), "submit", str(bad), "--store",
                        str(store)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"error: {bad}: request 'r9': forget set is empty" in p.stderr
    after = snapshot(store)
    assert {k: v for k, v in after.items() if not k.endswith("ledger.lock")} == \
        {k: v for k, v in before.items() if not k.endswith("ledger.lock")}  # (the lock file holds the writer's pid)
    p = subprocess.run([sys.executable, str(ROOT / "lumoe_engine" / "run.py"), "status", "--store", str(store)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("r1\tgate_updated\t")


# ------------------------------------------------------------------------------------------------ bad input
def _valid():
    return json.loads(json.dumps(R1))


def _raw(text):
    return lambda d: text


BAD_SUBMITS = [
    # (name, document edit -> dict | str | bytes, expected in the error)
    ("malformed JSON", _raw('{"id": "r1", "forget": [}'), "invalid JSON at line 1"),
    ("missing forget", lambda d: {k: v for k, v in d.items() if k != "forget"}, "has no forget set"),
    ("empty forget", lambda d: {**d, "forget": []}, "forget set is empty"),
    ("unknown top-level field", lambda d: {**d, "forgett": d["forget"]}, "unknown top-level field 'forgett'"),
    ("id with slash", lambda d: {**d, "id": "a/b"}, "id 'a/b'"),
    ("id dot-dot", lambda d: {**d, "id": ".."}, "id '..'"),
    ("id not a string", lambda d: {**d, "id": 17}, "id 17"),
    ("image missing", lambda d: {**d, "forget": [qa("Who?", "X", "nothere.png")]}, "forget[0].image"),
    ("image not an image", lambda d: {**d, "forget": [qa("Who?", "X", "notimage.png")]},
     "does not open as an image"),
    ("truncated PNG", lambda d: {**d, "forget": [qa("Who?", "X", "trunc.png")]}, "forget[0].image"),
    ("NaN in JSON", _raw('{"id": "r8", "forget": [{"question": "q", "answer": "a"}], "loss": {"name": "npo", '
                         '"beta": NaN}}'), "NaN is not valid JSON"),
    ("Infinity in JSON", _raw('{"id": "r8", "forget": [{"question": "q", "answer": "a"}], "loss": {"name": "npo", '
                              '"beta": -Infinity}}'), "-Infinity is not valid JSON"),
    ("duplicate keys", _raw('{"id": "r8", "id": "r9", "forget": [{"question": "q", "answer": "a"}]}'),
     "key 'id' appears twice"),
    ("forget not a list", lambda d: {**d, "forget": {"question": "q"}}, "'forget' must be a list"),
    ("question not a string", lambda d: {**d, "forget": [{"question": 3, "answer": "a"}]}, "forget[0].question"),
    ("item unknown field", lambda d: {**d, "forget": [{"qestion": "q", "question": "q", "answer": "a"}]},
     "forget[0].qestion"),
    ("unknown loss name", lambda d: {**d, "loss": {"name": "sgd"}}, "request 'r1': loss.name: loss 'sgd' is not known"),
    ("negative beta", lambda d: {**d, "loss": {"name": "npo", "beta": -0.5}}, "loss options are invalid: beta=-0.5"),
    ("loss needs retain", lambda d: {**{k: v for k, v in d.items() if k != "retain"}, "loss": "gd"},
     "needs a retain set"),
    ("pair forgotten and retained", lambda d: {**d, "retain": [d["forget"][0]]}, "retain[0]"),
    ("top level a list", _raw('[{"question": "q", "answer": "a"}]'), "top level is a JSON list"),
    ("not UTF-8", _raw(b'{"forget": [{"question": "caf\xe9", "answer": "a"}]}'), "not UTF-8"),
    ("content_hash mismatch", lambda d: {**d, "content_hash": "0" * 64}, "content_hash"),
    ("id taken by other content", lambda d: {**d, "entity": "Someone Else"},
     "request 'r1': id: the id is already used"),
    ("store refuses the shared-lora method", lambda d: {**d, "method": "shared-lora"}, "method 'shared-lora'"),
    ("metadata not an object", lambda d: {**d, "metadata": [1]}, "'metadata' must be a JSON object"),
    ("retain item empty answer", lambda d: {**d, "retain": [qa("Who is Mira Sollen?", "  ")]}, "retain[0]"),
    ("image path not a string", lambda d: {**d, "forget": [qa("Who?", "X", 5)]}, "forget[0].image"),
]


@pytest.fixture(scope="module")
def bad_store(processed, tmp_path_factory):
    """A copy of the processed store for the bad-input tests (each checks it is left byte-identical)."""
    return copy_store(processed, tmp_path_factory.mktemp("bad") / "store")


@pytest.mark.parametrize("name,edit,expected", BAD_SUBMITS, ids=[b[0] for b in BAD_SUBMITS])
def test_bad_request_file_is_refused_and_changes_nothing(bad_store, tmp_path, capsys, name, edit, expected):
    write_requests(tmp_path)
    (tmp_path / "notimage.png").write_text("just text")
    good = (tmp_path / "vorla.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(good[:len(good) // 2])
    doc = edit(_valid())
    f = tmp_path / "request.json"
    if isinstance(doc, bytes):
        f.write_bytes(doc)
    else:
        f.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    before = snapshot(bad_store)
    rc, out, err = cli(capsys, "submit", f, "--store", bad_store)
    assert rc == 2, (out, err)
    line = err.strip().splitlines()[-1]
    print(line)
    assert line.startswith(f"error: {f}: ") and expected in line, line
    assert snapshot(bad_store) == before


def test_missing_file_in_a_mixed_batch(processed, tmp_path, capsys):
    store = copy_store(processed, tmp_path / "store")
    good = write_requests(tmp_path, {"id": "r-new", "forget": [qa("Who is Ada Quill?", "A printer.")]})[0]
    missing = tmp_path / "nothere.json"
    rc, out, err = cli(capsys, "submit", missing, good, "--store", store)
    assert rc == 2 and f"error: {missing}: request file 'nothere.json': not found" in err
    assert f"{good}: received as r-new" in out  # the good file of the batch is recorded
    with Ledger(store / "ledger", readonly=True) as led:
        assert led.requests() == ["r1", "r2", "r-new"]
    before = snapshot(store)
    rc, out, err = cli(capsys, "process", "--store", store, "--steps", "0")
    assert rc == 2 and "TrainConfig.steps=0" in err  # refused before any model is loaded
    rc, out, err = cli(capsys, "process", "--store", store, "--only", "r404")
    assert rc == 2 and "unknown request id 'r404'" in err
    assert snapshot(store) == before


def test_revoke_unknown_id_changes_nothing(bad_store, capsys):
    before = snapshot(bad_store)
    rc, out, err = cli(capsys, "revoke", "r404", "--store", bad_store)
    assert rc == 2 and "unknown request id 'r404'" in err and "nothing was changed" in err
    rc, out, err = cli(capsys, "revoke", "../r1", "--out", bad_store)
    assert rc == 2 and "unknown request id '../r1'" in err
    assert snapshot(bad_store) == before


def test_revoke_while_process_holds_the_store_is_recorded_then_finished(processed, tmp_path, capsys, cache):
    store = copy_store(processed, tmp_path / "store")
    with store_mod.Store(store).work_lock():  # a 'process' run is changing the bank and the gate
        rc, out, err = cli(capsys, "revoke", "r1", "--store", store)
        assert rc == 0, err
        assert "r1: revoked" in out and "a 'process' run holds the store" in out
        assert "r1" in json.loads(_manifest(store).read_text())["experts"][0]["id"]  # not removed yet
        rc, out, err = cli(capsys, "process", "--store", store, *FAST)
        assert rc == 2 and "is busy" in err  # a second process is refused
    rc, out, err = cli(capsys, "process", "--store", store, "--cache", cache, *FAST)
    assert rc == 0 and "r1: expert removed (revoked)" in out, err
    assert [e["id"] for e in json.loads(_manifest(store).read_text())["experts"]] == ["r2"]


def test_submit_to_a_locked_store_is_refused(bad_store, tmp_path, capsys):
    f = write_requests(tmp_path, {"id": "r-lock", "forget": [qa("Who is Ada Quill?", "A printer.")]})[0]
    holder = subprocess.Popen(  # another writer process holds the ledger
        [sys.executable, "-c", "import sys, time; from lumoe_engine.ledger import Ledger; led = Ledger(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(120)", str(bad_store / "ledger")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(bad_store)
        rc, out, err = cli(capsys, "submit", f, "--store", bad_store)
        assert rc == 2 and "in use by another writer" in err and f"held by pid {holder.pid}" in err
        assert str(bad_store / "ledger") in err
        assert snapshot(bad_store) == before
        rc, out, err = cli(capsys, "revoke", "r1", "--store", bad_store)
        assert rc == 2 and "in use by another writer" in err
        assert snapshot(bad_store) == before
    finally:
        holder.kill()
        holder.wait()


def test_store_arguments_are_checked(tmp_path, capsys):
    rc, _, err = cli(capsys, "status", "--store", tmp_path / "none")
    assert rc == 2 and "is not a request store" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    f = write_requests(tmp_path / "in", {"id": "a1", "forget": [qa("q?", "a")]})[0]
    rc, _, err = cli(capsys, "submit", f, "--store", tmp_path / "full")
    assert rc == 2 and "not empty but holds no store.json" in err
    rc, _, err = cli(capsys, "submit", "--store", tmp_path / "s")
    assert rc == 2 and "give request files, or --watch" in err
    rc, _, err = cli(capsys, "revoke", "a1", "--out", tmp_path / "full")
    assert rc == 2 and "neither a store" in err


# ---------------------------------------------------------------------------------- damaged bank and gate files
class _Boom:
    """Unpickling this writes the marker file: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickle_bytes(marker: Path) -> bytes:
    data = pickle.dumps(_Boom(str(marker)))
    probe = marker.with_name("probe")
    pickle.loads(pickle.dumps(_Boom(str(probe))))  # the payload really acts when unpickled
    assert probe.exists()
    probe.unlink()
    return data


def _manifest(store):
    return store / "bank" / "manifest.json"


def _edit_manifest(store, fn):
    doc = json.loads(_manifest(store).read_text())
    fn(doc)
    _manifest(store).write_text(json.dumps(doc, indent=1))


def _sha(b):
    return hashlib.sha256(b).hexdigest()


def _pickle_as_expert(store, marker):  # same name, manifest updated to match: sha/size pass, safetensors refuses
    data = _pickle_bytes(marker)
    (store / "bank" / "experts" / "r1.safetensors").write_bytes(data)
    _edit_manifest(store, lambda d: d["experts"][0].update(bytes=len(data), sha256=_sha(data)))


def _pickle_replaces_file(store, marker):  # manifest untouched: size / sha256 mismatch
    (store / "bank" / "experts" / "r1.safetensors").write_bytes(_pickle_bytes(marker))


def _manifest_names_pickle(store, marker):
    data = _pickle_bytes(marker)
    (store / "bank" / "experts" / "r1.bin").write_bytes(data)
    _edit_manifest(store, lambda d: d["experts"][0].update(file="r1.bin", bytes=len(data), sha256=_sha(data)))


def _corrupt_safetensors(store, marker):
    p = store / "bank" / "experts" / "r1.safetensors"
    data = bytearray(p.read_bytes())
    data[8:16] = b"\x00garbage"  # the JSON header
    p.write_bytes(bytes(data))
    _edit_manifest(store, lambda d: d["experts"][0].update(sha256=_sha(bytes(data))))


def _manifest_missing_file(store, marker):
    (store / "bank" / "experts" / "r2.safetensors").unlink()


def _truncated_expert(store, marker):
    p = store / "bank" / "experts" / "r2.safetensors"
    p.write_bytes(p.read_bytes()[:100])


def _gate_truncated(store, marker):
    p = next((store / "gate").glob("gate-*.safetensors"))
    p.write_bytes(p.read_bytes()[:50])


def _gate_json_garbage(store, marker):
    (store / "gate" / "gate.json").write_text('{"format": "lumoe-gate", "vers')


DAMAGE = [
    ("pickle with matching manifest", _pickle_as_expert, "r1.safetensors"),
    ("pickle replaces the expert file", _pickle_replaces_file, "r1.safetensors"),
    ("manifest names a non-safetensors file", _manifest_names_pickle, "must be 'r1.safetensors'"),
    ("corrupt safetensors header", _corrupt_safetensors, "r1.safetensors"),
    ("manifest names a missing file", _manifest_missing_file, "r2.safetensors"),
    ("truncated expert file", _truncated_expert, "r2.safetensors"),
    ("gate tensor file truncated", _gate_truncated, "gate"),
    ("gate.json not JSON", _gate_json_garbage, "gate.json"),
]


@pytest.mark.parametrize("name,damage,expected", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_bank_or_gate_is_refused_never_unpickled(processed, tmp_path, capsys, name, damage, expected):
    store = copy_store(processed, tmp_path / "store")
    marker = tmp_path / "UNPICKLED"
    damage(store, marker)
    f = write_requests(tmp_path / "in", {"id": "r-late", "forget": [qa("Who is Ada Quill?", "A printer.")]})[0]
    rc, _, err = cli(capsys, "submit", f, "--store", store)  # the ledger is not the bank: submit still works
    assert rc == 0, err
    before = snapshot(store)
    for argv in (("process", "--store", store, *FAST), ("verify", "--store", store)):
        rc, out, err = cli(capsys, *argv)
        assert rc == 2, (argv, out, err)
        assert err.startswith("error: ") and expected in err, err
        assert snapshot(store) == before
    assert not marker.exists()
    with Ledger(store / "ledger", readonly=True) as led:
        assert led.state("r-late") == "received"  # refused before anything was trained


def test_planted_pickles_are_never_loaded(processed, tmp_path, capsys):
    store = copy_store(processed, tmp_path / "store")
    marker = tmp_path / "UNPICKLED"
    data = _pickle_bytes(marker)
    for rel in ("bank/experts/r1.pt", "bank/experts/r1.bin", "bank/adapter_model.bin", "gate/gate.pt"):
        (store / rel).write_bytes(data)
    rc, out, err = cli(capsys, "verify", "--store", store)
    assert rc == 0, out + err
    rc, out, err = cli(capsys, "process", "--store", store, *FAST)
    assert rc == 0 and "nothing to process" in out, err
    rc, out, err = cli(capsys, "revoke", "r1", "--store", store)
    assert rc == 0 and "expert removed" in out, err
    assert not marker.exists()
