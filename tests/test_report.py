"""report.md and the figures: every method reported, sentences that follow the numbers, valid PNG files."""
import json
import logging
import sys

import pytest
from PIL import Image

from lumoe_engine.data.mlubench import load_benchmark
from lumoe_engine.data.protocol import Split
from lumoe_engine.data.streams import build_stream
from lumoe_engine.data.synthetic import SyntheticConfig, write_synthetic
from lumoe_engine.eval import report as report_mod
from lumoe_engine.eval.metrics import MetricsWriter, StreamEvaluator, read_rows
from lumoe_engine.eval.plots import write_plots
from lumoe_engine.eval.report import story, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_benchmark(write_synthetic(tmp_path_factory.mktemp("syn") / "tiny", SyntheticConfig.preset("tiny")))


def _run(bench, spec, out, methods=("lumoe", "ga", "kl"), cap=12):
    """A stream measured for fake methods whose behaviour is known in advance.

    lumoe: forgets every learned entity, keeps all else, routes perfectly.
    ga:    forgets only the latest request (earlier ones relapse); loses a growing share of retained facts.
    kl:    forgets every learned entity; the retained facts it answers right grow step by step (rising retain).
    """
    split = Split(bench)
    reqs = [split.carry(r) for r in build_stream(bench, spec)]
    ev = StreamEvaluator(bench, reqs, split=split, max_per_set=cap, seed=1)
    qs = ev.queries()
    ev.set_base({q.uid: q.answer for q in qs})
    owner = {e: r.id for r in reqs for e in r.entities}
    order = {q.uid: i for i, q in enumerate(qs)}
    w = MetricsWriter(out)
    n = len(reqs)
    for t in range(n):
        done = {e for r in reqs[: t + 1] for e in r.entities}
        for m in methods:
            preds, routing = {}, {}
            for q in ev.queries(t):
                forget = q.entity in (done if m != "ga" else set(reqs[t].entities))
                if q.entity in done:
                    preds[q.uid] = "no idea" if forget else q.answer
                elif m == "ga":
                    preds[q.uid] = "no idea" if order[q.uid] % (n + 1) < t + 1 else q.answer
                elif m == "kl":
                    preds[q.uid] = q.answer if order[q.uid] % (n + 1) < t + 1 else "no idea"
                else:
                    preds[q.uid] = q.answer
                routing[q.uid] = [owner[q.entity]] if q.entity in done else []
            cost = {"seconds": 1.0 + t, "bytes_per_expert": 2048, "tokens_per_s": 100.0}
            w.append(ev.evaluate_step(t, m, preds, routing if m == "lumoe" else None, cost))
    w.write_evaluator(ev, config={"stream": spec, "benchmark": "synthetic:tiny"}, seeds=[1])
    return json.loads((out / "summary.json").read_text()), read_rows(out / "metrics.jsonl")


def test_report_and_story(tiny, tmp_path):
    summary, rows = _run(tiny, "abcd", tmp_path)
    files = write_plots(tmp_path, summary)
    path = write_report(tmp_path, summary, rows, summary["config"])
    text = path.read_text()
    for m in ("lumoe", "ga", "kl"):
        assert f"| {m} |" in text and f"## {m}" in text and f"### {m}: step by step" in text
    assert "## The story in numbers" in text and "stream `abcd`" in text
    for f in files:
        assert f"]({f.name})" in text  # figures linked
    fin = summary["methods"]["ga"]["final"]
    # the final-table row of ga carries its numbers
    assert f"| ga | {fin['retain_ratio_test']:.3f} |" in text
    assert f"{fin['test']['leak']['image_text']:.3f} ({fin['test']['n_known']['image_text']})" in text
    assert "## Request data vs test data" in text

    lines = story(summary["methods"], rows)
    by = {m: [s for s in lines if s.startswith(m + ":")] for m in ("lumoe", "ga", "kl")}
    assert any("forgetting relapsed" in s and "taskA" in s for s in by["ga"])
    assert any("retain ratio fell from" in s and "cumulatively" in s for s in by["ga"])
    assert any("no relapse" in s for s in by["lumoe"]) and any("no relapse" in s for s in by["kl"])
    assert any("held between 1.000 and 1.000" in s for s in by["lumoe"])
    assert any("retain ratio rose from" in s for s in by["kl"])
    assert any("gate sent 100.0% of forget test queries" in s for s in by["lumoe"])
    assert not any("gate" in s for s in by["ga"])
    assert any("highest retain ratio is lumoe's (1.000)" in s for s in lines)
    assert any("seconds per request grew" in s for s in by["lumoe"])


def test_story_follows_the_numbers(tiny, tmp_path):
    """The same rule gives the opposite sentence when the numbers say the opposite."""
    summary, rows = _run(tiny, "ab", tmp_path, methods=("ga",))
    s = summary["methods"]["ga"]
    assert any("forgetting relapsed" in x for x in story({"ga": s}, rows))
    calm = [dict(r, relapse=0.0) if r.get("relapse") is not None else r for r in rows]
    assert any("no relapse" in x for x in story({"ga": s}, calm))
    flat = json.loads(json.dumps(s))
    flat["curves"]["retain_ratio_test"] = [0.9, 0.91]
    out = story({"ga": flat}, rows)
    assert any("held between 0.900 and 0.910" in x for x in out) and not any("fell from" in x for x in out)


def test_long_stream_step_table(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(report_mod, "MAX_STEP_ROWS", 5)
    summary, rows = _run(tiny, "synthetic:9", tmp_path, methods=("lumoe",), cap=4)
    text = write_report(tmp_path, summary, rows).read_text()
    assert "(5 of 9 steps shown" in text
    table = text.split("### lumoe: step by step")[1].split("##")[0]
    assert table.count("\n| ") == 1 + 5  # header + 5 steps


def test_plots_are_png(tiny, tmp_path):
    summary, _ = _run(tiny, "ab", tmp_path)
    files = write_plots(tmp_path, summary)
    assert sorted(f.name for f in files) == ["forget_curves.png", "gate.png", "retain_curve.png"]
    for f in files:
        assert f.read_bytes()[:8] == PNG_MAGIC
        with Image.open(f) as im:
            im.verify()
        with Image.open(f) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    no_gate = {"methods": {"ga": summary["methods"]["ga"]}}
    out = tmp_path / "nogate"
    assert sorted(f.name for f in write_plots(out, no_gate)) == ["forget_curves.png", "retain_curve.png"]
    with pytest.raises(ValueError, match="methods"):
        write_plots(tmp_path, {"methods": {}})
    with pytest.raises(ValueError, match="methods"):
        write_report(tmp_path, {}, [])


def test_plots_skip_without_matplotlib(tiny, tmp_path, monkeypatch, caplog):
    summary, _ = _run(tiny, "a", tmp_path, methods=("lumoe",))
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with caplog.at_level(logging.WARNING):
        assert write_plots(tmp_path / "none", summary) == []
    assert sum("matplotlib is not installed" in r.message for r in caplog.records) == 1
    assert not (tmp_path / "none" / "retain_curve.png").exists()
