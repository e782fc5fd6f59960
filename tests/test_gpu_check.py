"""benchmarks/gpu_check.sh's time limit, on this CPU (DRY=1): the call ends within TOTAL_S, a part gets what is
left of it when that is less than its own timeout, and a part that cannot fit is skipped, said, and not started.
(CI runs the parts themselves: DRY=1 PARTS="tests bench".)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def check(out: Path, parts: str, total_s: int) -> str:
    env = {
        **os.environ,
        "DRY": "1",
        "PARTS": parts,
        "TOTAL_S": str(total_s),
        "OUT": str(out),
        "WORK": str(out.with_name(out.name + "-work")),
        "PYTHON": sys.executable,
    }
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return (out / "summary.txt").read_text()


def test_a_part_is_cut_to_what_is_left_of_the_total_or_skipped_when_that_is_too_little(tmp_path):
    summary = check(tmp_path / "cut", "tests", total_s=80)  # 80 s less 20 for the archive: under tests' 120
    left = re.search(r"tests: (\d+)s left of TOTAL_S=80s, not its 120s", summary)
    assert left and 30 <= int(left.group(1)) <= 60, summary
    assert "cuda tests: skipped (DRY: no CUDA device)" in summary  # and then it ran

    summary = check(tmp_path / "skip", "all", total_s=45)  # under 30 s left after the archive's 20
    assert re.search(r"all: skipped, \d+s of TOTAL_S=45s left", summary), summary
    assert "all: redheart-730m config" not in summary and not (tmp_path / "skip-work" / "all.log").exists()
    # $OUT holds the summary and the archive alone (a device call brings back a few files), written either way
    assert sorted(p.name for p in (tmp_path / "skip").iterdir()) == ["results.tar.gz", "summary.txt"]
    with tarfile.open(tmp_path / "skip" / "results.tar.gz") as archive:
        assert "./summary.txt" in archive.getnames()
