"""The soak script's short form: `scripts/soak.py --seconds 15` on the tiny chat model, in its own
server process (the 30-minute figures are in docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_soak_loses_nothing_and_comes_back_to_idle(chat_model):
    command = [sys.executable, str(ROOT / "scripts" / "soak.py"), "--seconds", "15", "--model", str(chat_model[1]),
               "--threads", "3"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.stdout.startswith("{"), done.stderr[-3000:]
    report = json.loads(done.stdout)
    requests, churn = report["requests"], report["adapter_churn"]
    assert done.returncode == 0 and report["ok"], json.dumps(report, indent=1)
    assert requests["lost"] == 0 and requests["bad_input_5xx"] == 0 and requests["good_5xx"] == 0
    assert requests["served"] > 0 and requests["bad_input_refused_4xx"] > 0 and requests["disconnected"] > 0
    assert requests["sent"] == sum(requests[k] for k in ("served", "refused_cleanly", "bad_input_refused_4xx",
                                                         "disconnected", "lost", "bad_input_5xx", "good_5xx",
                                                         "mismatched")) + sum(requests["other"].values())
    assert churn["loaded"] == churn["unloaded"] > 10 and churn["bad_refused_4xx"] > 0
    before, after = report["before"], report["after"]
    assert after["kv_slots"] == 0 and after["registered_adapters"] == before["registered_adapters"]
    assert after["adapter_slots"] <= before["adapter_slots"]
    assert report["exit_code_after_sigterm"] in (0, -15)
