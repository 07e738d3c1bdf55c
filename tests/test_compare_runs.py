"""``benchmarks/compare_runs.py``: two run folders compared by expert bytes, gate hash and metrics rows; a changed
byte, a changed gate or a changed row must be found, wall-clock values must not count."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "benchmarks" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def _run(folder: Path, expert=b"weights", gate_sha="abc", leak=0.0, seconds=1.0) -> Path:
    (folder / "bank" / "experts").mkdir(parents=True)
    (folder / "bank" / "experts" / "taskA.safetensors").write_bytes(expert)
    (folder / "gate").mkdir()
    (folder / "gate" / "gate.json").write_text(json.dumps({"sha256": gate_sha, "reports": {"taskA": {"seconds": seconds,
                                                                                                    "n_pos": 3}}}))
    row = {"step": 0, "method": "lumoe", "request": "taskA", "form": "image_text", "leak": leak, "seconds": seconds}
    (folder / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (folder / "summary.json").write_text(json.dumps({"methods": {"lumoe": {"final": {"leak": leak}}},
                                                     "total_seconds": seconds}))
    return folder


def test_equal_runs_apart_from_wall_clock(tmp_path):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b", seconds=9.5)
    assert compare_runs.compare(a, b) == []
    assert compare_runs.main([str(a), str(b)]) == 0


def test_a_changed_expert_gate_or_row_is_found(tmp_path):
    a = _run(tmp_path / "a")
    for i, kw in enumerate(({"expert": b"weightz"}, {"gate_sha": "abd"}, {"leak": 0.5})):
        b = _run(tmp_path / f"b{i}", **kw)
        diffs = compare_runs.compare(a, b)
        assert diffs, kw
        assert compare_runs.main([str(a), str(b)]) == 1


def test_layout_over_ranks_does_not_count_but_a_result_does(tmp_path):
    """A 2-rank request-parallel run against a single process: the waves and per-rank placement differ, the results
    do not (benchmarks/compare_runs.LAYOUT_KEYS); a differing result next to them is still found."""
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b")
    doc = json.loads((b / "summary.json").read_text())
    doc["methods"]["lumoe"]["parallel"] = {"mode": "requests", "world_size": 2, "waves": [{"seconds": 3.0}]}
    doc["methods"]["lumoe"]["placement"] = [{"local_rank": 0}, {"local_rank": 1}]
    (b / "summary.json").write_text(json.dumps(doc))
    rows = [dict(json.loads((b / "metrics.jsonl").read_text()), wave_seconds=3.0)]
    (b / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert compare_runs.compare(a, b) == []
    doc["methods"]["lumoe"]["final"]["leak"] = 0.25
    (b / "summary.json").write_text(json.dumps(doc))
    assert compare_runs.compare(a, b) == ["summary: method lumoe differs in ['final']"]
