"""``seeding.stable_seed``: the same value in every process (whatever PYTHONHASHSEED), different parts different
seeds, and within the range every RNG of the project accepts."""
import os
import subprocess
import sys

from lumoe_engine.seeding import stable_seed


def test_same_in_another_process_and_hash_seed():
    here = stable_seed("expert", 0, "taskA")
    code = "from lumoe_engine.seeding import stable_seed; print(stable_seed('expert', 0, 'taskA'))"
    for hs in ("0", "12345"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONHASHSEED=hs)).stdout
        assert int(out) == here


def test_parts_matter_and_range():
    seeds = {stable_seed("gate-head", s, e) for s in range(3) for e in ("a", "b", "c")}
    assert len(seeds) == 9
    assert stable_seed("a", "b") != stable_seed("ab") != stable_seed("a", "b", "")
    assert all(0 <= s < 1 << 63 for s in seeds)
