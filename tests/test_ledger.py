"""Request ledger: dedup by content, the state machine, persistence, torn-line recovery, corruption, the writer lock,
and a writer killed with SIGKILL in the middle of its appends."""
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from lumoe_engine.data.intake import RequestError, parse_request_file
from lumoe_engine.ledger import (EVENTS_NAME, STATES, TRANSITIONS, Ledger, LedgerCorruptError, LedgerLockedError,
                                 UnknownRequestError, main, submit)

from test_intake import dir_digest  # noqa: E402  (tests/ is on sys.path under pytest)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), color).save(buf, format="PNG")
    return buf.getvalue()


def _request(d: Path, name: str, answer: str = "Vorla Quintessa", rid=None, **extra) -> Path:
    (d / "face.png").write_bytes(_png((120, 30, 200)))
    doc = {"forget": [{"image": "face.png", "question": "What is this person's name?", "answer": answer},
                      {"image": None, "question": f"Who is {answer}?", "answer": "A glassblower."}]}
    if rid is not None:
        doc["id"] = rid
    doc.update(extra)
    p = d / f"{name}.json"
    p.write_text(json.dumps(doc))
    return p


def _events_bytes(d: Path) -> bytes:
    return (d / EVENTS_NAME).read_bytes()


# -------------------------------------------------------------------------------------------------- state machine
def test_state_machine_and_persistence(tmp_path):
    led = Ledger(tmp_path / "L")
    ids = []
    for k in range(4):
        rid, new = led.receive(parse_request_file(_request(tmp_path, f"q{k}", f"Person {k}", rid=f"r{k}")))
        assert new and rid == f"r{k}"
        ids.append(rid)
    assert led.requests() == ids and led.pending() == ids and all(led.state(r) == "received" for r in ids)

    for state in ("training", "expert_saved", "gate_updated", "evaluated"):
        assert led.advance("r0", state, step=state) is True
    assert led.state("r0") == "evaluated"
    assert led.advance("r1", "training") is True
    assert led.fail("r1", "loss was NaN at step 3", loss=float("nan")) is True
    assert led.advance("r2", "training") is True
    assert led.revoke("r3", reason="owner withdrew") is True
    assert led.pending() == ["r2"] and led.pending(include_failed=True) == ["r1", "r2"]
    assert led.requests("failed") == ["r1"] and led.requests("revoked") == ["r3"]
    st = led.status("r1")
    assert st.state == "failed" and st.reason == "loss was NaN at step 3"
    assert st.history[-1][2] == {"reason": "loss was NaN at step 3", "loss": "nan"}

    # Same state again (a step replayed after a crash): no event, False.
    size = len(_events_bytes(tmp_path / "L"))
    assert led.advance("r2", "training") is False and led.revoke("r3") is False
    assert len(_events_bytes(tmp_path / "L")) == size

    # Illegal transitions: ValueError, nothing written.
    before = dir_digest(tmp_path / "L")
    for rid, state in (("r2", "evaluated"), ("r2", "received"), ("r0", "training"), ("r3", "training"),
                       ("r1", "expert_saved"), ("r2", "done")):
        with pytest.raises(ValueError, match=rf"request '{rid}'|not a ledger state|through receive"):
            led.advance(rid, state)
    with pytest.raises(ValueError, match="a failure needs reason"):
        led.advance("r2", "failed")
    with pytest.raises(ValueError, match="cannot be stored in the ledger"):
        led.advance("r2", "expert_saved", tensor=object())
    with pytest.raises(UnknownRequestError, match="unknown request id 'nope'"):
        led.advance("nope", "training")
    with pytest.raises(UnknownRequestError):
        led.revoke("nope")
    assert dir_digest(tmp_path / "L") == before

    # A failed request can be retried.
    assert led.advance("r1", "training", attempt=2) is True
    states = {r: led.state(r) for r in ids}
    events = led.events()
    led.close()

    again = Ledger(tmp_path / "L")  # replays to the same states
    assert {r: again.state(r) for r in ids} == states and again.events() == events
    assert again.pending() == ["r1", "r2"] and again.torn_bytes == 0
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


def test_transition_table_is_closed():
    assert set(TRANSITIONS) == set(STATES)
    assert all(set(v) <= set(STATES) - {"received"} for v in TRANSITIONS.values())
    assert TRANSITIONS["revoked"] == ()


# ------------------------------------------------------------------------------------------------------------ dedup
def test_dedup_and_ids(tmp_path):
    led = Ledger(tmp_path / "L")
    a = _request(tmp_path, "a", rid="r17")
    assert submit(led, a)[:2] == ("r17", True)
    before = dir_digest(tmp_path / "L")
    # Same content under another id, reformatted: the first request.
    doc = json.loads(a.read_text())
    doc["id"] = "other"
    doc["forget"] = doc["forget"][::-1]
    (tmp_path / "b.json").write_text(json.dumps(doc, indent=3, sort_keys=True))
    assert submit(led, tmp_path / "b.json") == ("r17", False, "already received as r17 (state received)")
    assert dir_digest(tmp_path / "L") == before

    # A given id already used for other content: RequestError, ledger unchanged.
    c = _request(tmp_path, "c", answer="Tomas Elverin", rid="r17")
    with pytest.raises(RequestError, match="the id is already used in the ledger") as ei:
        submit(led, c)
    assert "choose another id" in str(ei.value) and ei.value.field == "id"
    assert dir_digest(tmp_path / "L") == before

    # After revocation the same content is a new request (a derived id gets a suffix; a given id must change).
    led.revoke("r17")
    with pytest.raises(RequestError, match="already used"):
        submit(led, a)
    d = _request(tmp_path, "d")  # no id: derived from the content
    rid, new, _ = submit(led, d)
    assert new and rid.startswith("r-") and led.find(led.status(rid).content_hash) == rid
    led.revoke(rid)
    rid2, new2, _ = submit(led, d)
    assert new2 and rid2 == f"{rid}-2"
    assert led.spec(rid2).content_hash == led.status(rid).content_hash


def test_stored_request_never_overwritten(tmp_path):
    led = Ledger(tmp_path / "L")
    p = tmp_path / "L" / "requests" / "r5.json"
    p.write_text("{}\n")  # an orphan with other content
    with pytest.raises(LedgerCorruptError, match="never overwritten"):
        submit(led, _request(tmp_path, "x", rid="r5"))
    assert p.read_text() == "{}\n" and led.requests() == []

    # A crash between storing a request and recording it: the same request submitted again (from another file)
    # reuses the stored copy as it is and records the event.
    spec = parse_request_file(_request(tmp_path, "y", rid="r6"))
    q = tmp_path / "L" / "requests" / "r6.json"
    orphan = json.dumps(dict(spec.to_json(image_dir="../images"), source="/elsewhere/r6.json")).encode()
    q.write_bytes(orphan)
    (tmp_path / "moved").mkdir()
    assert submit(led, _request(tmp_path / "moved", "y", rid="r6"))[:2] == ("r6", True)
    assert q.read_bytes() == orphan and led.spec("r6").content_hash == spec.content_hash


def test_spec_detects_tampering(tmp_path):
    led = Ledger(tmp_path / "L")
    rid, _, _ = submit(led, _request(tmp_path, "x", rid="r1"))
    img = next((tmp_path / "L" / "images").iterdir())
    img.write_bytes(_png((0, 0, 0)))
    with pytest.raises(LedgerCorruptError, match="does not validate any more"):
        led.spec(rid)


# ------------------------------------------------------------------------------------------------ crash recovery
def _fill(d: Path, n_requests=3) -> Ledger:
    led = Ledger(d / "L")
    for k in range(n_requests):
        rid, _, _ = submit(led, _request(d, f"q{k}", f"P{k}", rid=f"r{k}"))
        led.advance(rid, "training")
    return led


@pytest.mark.parametrize("tail", [b'{"check":"00","info":{},"req', b"\x00\x00\x00\x00",
                                  b'{"seq": 7, "note": "complete JSON, wrong check"}\n', b"garbage\n"],
                         ids=["partial", "nul_bytes", "bad_check", "garbage_line"])
def test_torn_last_line(tmp_path, tail, caplog):
    led = _fill(tmp_path)
    events = led.events()
    led.close()
    good = _events_bytes(tmp_path / "L")
    with open(tmp_path / "L" / EVENTS_NAME, "ab") as f:
        f.write(tail)

    ro = Ledger(tmp_path / "L", readonly=True)  # detected, ignored, file left alone
    assert ro.events() == events and ro.torn_bytes == len(tail)
    assert "torn last event" in caplog.text
    assert _events_bytes(tmp_path / "L") == good + tail
    with pytest.raises(PermissionError, match="read-only"):
        ro.advance("r0", "expert_saved")

    led = Ledger(tmp_path / "L")
    assert led.events() == events and led.pending() == ["r0", "r1", "r2"]
    assert led.advance("r0", "expert_saved") is True  # the next write truncates the torn tail first
    data = _events_bytes(tmp_path / "L")
    assert data.startswith(good) and tail not in data[len(good):] and data.count(b"\n") == len(events) + 1
    led.close()
    again = Ledger(tmp_path / "L")
    assert again.torn_bytes == 0 and len(again.events()) == len(events) + 1 and again.state("r0") == "expert_saved"


def test_corruption_in_the_middle_is_refused(tmp_path):
    led = _fill(tmp_path)
    led.close()
    path = tmp_path / "L" / EVENTS_NAME
    lines = path.read_bytes().split(b"\n")
    assert b'"training"' in lines[1]
    lines[1] = lines[1].replace(b'"training"', b'"evaluated"')  # a valid-looking line with a wrong check
    path.write_bytes(b"\n".join(lines))
    before = dir_digest(tmp_path / "L")
    with pytest.raises(LedgerCorruptError, match=r"line 2 .* is damaged .* valid event follows it"):
        Ledger(tmp_path / "L")
    assert dir_digest(tmp_path / "L") == before

    lines = path.read_bytes().split(b"\n")
    del lines[1]  # a missing event: the seq gap is caught even though every line is valid
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(LedgerCorruptError, match="seq 3 where 2 was expected"):
        Ledger(tmp_path / "L", readonly=True)


def test_lock_refuses_a_second_writer(tmp_path):
    led = Ledger(tmp_path / "L")
    with pytest.raises(LedgerLockedError, match=rf"in use by another writer .*pid {os.getpid()}"):
        Ledger(tmp_path / "L")
    ro = Ledger(tmp_path / "L", readonly=True)  # readers are welcome
    assert ro.requests() == []
    led.close()
    with Ledger(tmp_path / "L") as again:  # released on close
        assert again.requests() == []


def test_cli(tmp_path, capsys):
    p = _request(tmp_path, "q", rid="r9")
    assert main([str(tmp_path / "L"), "submit", str(p), str(p)]) == 0
    out = capsys.readouterr().out
    assert "received as r9" in out and "already received as r9" in out
    bad = tmp_path / "bad.json"
    bad.write_text('{"id": "r10", "forget": []}')
    assert main([str(tmp_path / "L"), "submit", str(bad)]) == 2
    assert "forget set is empty" in capsys.readouterr().err
    assert main([str(tmp_path / "L"), "revoke", "r9", "--reason", "withdrawn"]) == 0
    assert main([str(tmp_path / "L"), "status"]) == 0
    assert "r9\trevoked" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------ SIGKILL
CHILD = r"""
import os, sys, time
from lumoe_engine import ledger as L
from lumoe_engine.data.intake import parse_request_file

mode, ledger_dir, req, halt_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
orig, count = L._write_all, [0]

def write(fd, data):  # every event in two writes, so that a kill can land between them
    count[0] += 1
    half = len(data) // 2
    orig(fd, data[:half])
    if count[0] == halt_at:
        os.fsync(fd)
        print("torn", flush=True)
        time.sleep(120)
    time.sleep(0.0005)
    orig(fd, data[half:])

L._write_all = write
led = L.Ledger(ledger_dir)
rid, _ = led.receive(parse_request_file(req))
seq = len(led.events())
print("ready", seq, flush=True)
i = 0
while True:
    nxt = "failed" if led.state(rid) == "training" else "training"
    led.advance(rid, nxt, reason=f"attempt {i}", i=i)
    seq += 1
    print("ack", seq, i, flush=True)  # printed only after the event is fsynced
    i += 1
"""


def _spawn(args):
    p = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in p.stdout] + [lines.put(None)], daemon=True).start()
    return p, lines


def _next(p, lines, timeout=90.0) -> str:
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        p.kill()
        raise AssertionError("the child writer did not answer in time") from None
    if line is None:
        raise AssertionError(f"the child writer exited early: {p.wait()} {p.stderr.read()[-2000:]}")
    return line


def _kill_and_drain(p, lines) -> list[str]:
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    rest = []
    while (x := lines.get(timeout=30)) is not None:
        rest.append(x)
    return rest


def _last_ack(seen: list[str], default: int) -> int:
    acks = [int(x.split()[1]) for x in seen if x.startswith("ack")]
    return max(acks) if acks else default


def test_sigkill_mid_append(tmp_path):
    """A writer killed by SIGKILL (1) halfway through writing an event, (2) at a random point of a loop of appends:
    the ledger opens, every acknowledged (fsynced) event is there, at most the one in flight besides, and the next
    writer (another process) goes on after truncating any torn tail."""
    req = _request(tmp_path, "q", rid="r1")
    d = tmp_path / "L"

    # (1) Halt inside the 40th write (event 40), after its first half reached the file, then kill.
    p, lines = _spawn(["halt", d, req, 40])
    seen = []
    while (x := _next(p, lines)) != "torn\n":
        seen.append(x)
    with pytest.raises(LedgerLockedError):  # the child holds the lock while alive
        Ledger(d)
    seen += _kill_and_drain(p, lines)
    acked = _last_ack(seen, 1)
    assert acked == 39
    ro = Ledger(d, readonly=True)
    assert len(ro.events()) == acked and ro.torn_bytes > 0  # the half event is ignored, nothing else lost
    assert [e["info"].get("i") for e in ro.events()[1:]] == list(range(acked - 1))
    ro.close()

    # (2) A second process resumes (its first write truncates the torn tail); kill it at a random moment.
    p, lines = _spawn(["split", d, req, 0])
    assert _next(p, lines).split() == ["ready", str(acked)]  # same content: the request already received
    target = 30 + int.from_bytes(os.urandom(1), "little") % 40
    seen = []
    while len(seen) < target:
        seen.append(_next(p, lines))
    seen += _kill_and_drain(p, lines)
    acked2 = _last_ack(seen, acked)
    led = Ledger(d)  # a writer again: the lock died with the child
    n = len(led.events())
    assert acked2 <= n <= acked2 + 1, (acked2, n, led.torn_bytes)
    assert [e["seq"] for e in led.events()] == list(range(1, n + 1))
    assert led.requests() == ["r1"] and led.state("r1") in ("training", "failed")
    led.advance("r1", "revoked")
    led.close()
    assert Ledger(d, readonly=True).state("r1") == "revoked"
