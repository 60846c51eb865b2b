"""The shipped demo adapters load, stay small, and do what they say on the default model."""

from __future__ import annotations

import json
from pathlib import Path

from slora import SamplingParams

DEMO = Path(__file__).resolve().parents[2] / "adapters"


def test_demo_adapters_show_their_effect(default_llm):
    names = ["upper", "pirate", "json"]
    for name in names:
        assert sum(f.stat().st_size for f in (DEMO / name).iterdir()) < 2 * 2**20
        default_llm.add_adapter(name, str(DEMO / name))
    try:
        question = [{"role": "user", "content": "What is the capital of France?"}]
        outputs = default_llm.chat([question] * 4, SamplingParams(temperature=0, max_tokens=32),
                                   adapters=[None] + names)
        base, upper, pirate, as_json = (o.text for o in outputs)
        assert "Paris" in base
        assert upper == upper.upper() and any(c.isalpha() for c in upper)
        assert "Ahoy" in pirate or "matey" in pirate
        assert "answer" in json.loads(as_json)
    finally:
        for name in names:
            default_llm.remove_adapter(name)
