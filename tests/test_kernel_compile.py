"""The Triton kernels compile for real GPUs (sm_90: H100 / H200), checked without one: ``tests/kernel_compile.py``
records the launches the launchers make under the default configs (bf16 tiles into tl.dot as on a GPU, fp32, tf32,
routing, alignment) and compiles each down to a cubin with the ptxas Triton ships, in a fresh process without the
interpreter. Skipped when this Triton has no NVIDIA backend or ptxas. ``python tests/kernel_compile.py --set full
--targets 80,90`` also compiles every tuning candidate.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

HERE = Path(__file__).resolve().parent
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.is_file(), reason="this Triton has no NVIDIA backend / ptxas to compile with")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(HERE / "kernel_compile.py"), "--set", "quick", "--targets", "90"],
                          env=env, capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert records, f"no output (rc {done.returncode}): {done.stderr[-2000:]}"
    summary = records[-1]
    failed = [r for r in records[:-1] if not r["ok"]]
    assert not failed and done.returncode == 0, json.dumps(failed[:3], indent=1)[:3000]
    kernels = {r["kernel"] for r in records[:-1]}
    assert {"_lora_shrink_kernel", "_lora_expand_kernel", "_lora_grad_kernel", "_lora_decode_shrink_kernel",
            "_lora_decode_expand_kernel", "_topk_routing_kernel", "_align_scatter_kernel"} <= kernels
    dot16 = [r for r in records[:-1] if r["constexprs"].get("DOT16")]
    assert dot16 and all(r["mma"] > 0 for r in dot16), "16-bit dots must compile to tensor-core instructions"
    print(summary)
