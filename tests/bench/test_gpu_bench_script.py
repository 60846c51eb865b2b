"""`scripts/gpu_bench.py --part online` (the issue's 2-minute online run as a command of its own) runs end to
end on the CPU with a tiny model and scaled-down durations, and writes the two online headline figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_bench.py"


def test_online_part_writes_the_online_figures(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--part", "online", "--scale", "0.05",
                             "--model", "dummy:tiny", "--max-num-seqs", "16", "--no-progress", "--budget", "200"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    head = json.loads((tmp_path / "headline.json").read_text())
    assert head["online_n1000_r20_throughput"] > 0 and 0 <= head["online_n1000_r20_slo_attainment"] <= 1
    assert head["throughput_ratio_vs_base_n1000"] is None  # the offline points are the headline part's
    runs = json.loads((tmp_path / "result.json").read_text())["runs"]
    assert [(r["system"], r["mode"], r["request_rate"]) for r in runs] == [("slora", "online", 20.0)]
    assert any("online 6 s of arrivals" in note for note in head["notes"])  # 120 s scaled by 0.05
