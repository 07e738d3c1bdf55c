"""The house's rules that a grep can check: no module imports another module's private (``_``-prefixed) names, and
the stream and the store reach a request's expert through the one request pipeline."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _private_imports(paths):
    bad = []
    for p in paths:
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("lumoe_engine")):
                parts = (n.module or "").split(".")
                names = [a.name for a in n.names] + parts
                bad += [f"{p.relative_to(ROOT)}:{n.lineno}: {x}" for x in names
                        if x.startswith("_") and not x.startswith("__")]
            elif isinstance(n, ast.Import):
                bad += [f"{p.relative_to(ROOT)}:{n.lineno}: {a.name}" for a in n.names
                        if a.name.startswith("lumoe_engine")
                        and any(x.startswith("_") and not x.startswith("__") for x in a.name.split("."))]
    return bad


def test_no_module_imports_a_private_name_of_another():
    files = [p for d in ("lumoe_engine", "kernels", "csrc", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    assert _private_imports(files) == []


def test_the_checker_catches_a_private_import(tmp_path):
    f = ROOT / "tests" / "_layout_probe_tmp.py"
    try:
        f.write_text("from lumoe_engine.stream.steps import _hidden\nimport lumoe_engine._secret\n")
        assert len(_private_imports([f])) == 2
    finally:
        f.unlink()


def test_stream_and_store_learn_through_the_pipeline():
    """Neither caller trains, banks or gates a request itself: ``train_expert``, ``bank.add`` and ``gate.add_expert``
    appear in the pipeline, not in the stream's or the store's code."""
    callers = [ROOT / "lumoe_engine" / "store.py", *sorted((ROOT / "lumoe_engine" / "stream").glob("*.py"))]
    for p in callers:
        text = p.read_text(encoding="utf-8")
        for call in ("train_expert(", "bank.add(", "gate.add_expert(", "collapse_check("):
            assert call not in text, f"{p.relative_to(ROOT)} calls {call}: go through lumoe_engine.pipeline"
    assert "RequestPipeline(" in (ROOT / "lumoe_engine" / "store.py").read_text()
    assert "RequestPipeline(" in (ROOT / "lumoe_engine" / "stream" / "lumoe.py").read_text()
    pipe = (ROOT / "lumoe_engine" / "pipeline.py").read_text()
    for call in ("train_expert(", "self.bank.add(", "self.gate.add_expert(", "collapse_check(", '"expert_saved"',
                 '"gate_updated"', '"training"'):
        assert call in pipe
