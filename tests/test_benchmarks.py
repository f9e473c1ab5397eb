"""The benchmark scripts still run against the current code (they import the stages' own functions)."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO, committed_params_file


def test_epoch_speed_benchmark_times_all_four_ways_on_the_fixture_data(mirror):
    folder, _ = mirror
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/epoch_speed.py"), "--raw", str(folder), "--epochs", "1",
         "--params", str(committed_params_file())],  # not the workspace's: it may hold an experiment
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("tutorial", "train stage", "fit stage"))]
    assert len(rows) == 4, result.stdout
    for row in rows:
        seconds, speed_up, accuracy = row.split()[-3:]
        assert float(seconds) > 0 and speed_up.endswith("x") and 0 <= float(accuracy) <= 1, row
    # The train loop and skorch learn the same weights: the same test accuracy.
    assert rows[2].split()[-1] == rows[3].split()[-1], result.stdout
