"""Thousands of registered adapters, a pool that holds a few dozen: everything completes, correctly."""

from __future__ import annotations

import random

import pytest

from slora import LLM, SamplingParams
from slora.lora.adapter import AdapterError
from slora.fixtures import write_adapter

NUM_ADAPTERS = 2000
TARGET_SETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["down_proj"], ["up_proj", "o_proj"]]
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_arch, tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    for i in range(NUM_ADAPTERS):
        write_adapter(root / f"a{i:04d}", tiny_llama_arch, [1, 2, 4, 8][i % 4], TARGET_SETS[i % len(TARGET_SETS)],
                      seed=i, alpha=8)
    return root


def test_1000_requests_over_2000_adapters_with_a_small_pool(tiny_llama_folder, adapter_dir):
    llm = LLM(model=str(tiny_llama_folder[1]), lora_dir=str(adapter_dir), num_slots=900, max_num_seqs=32,
              max_cpu_adapters=64)
    engine = llm.engine
    assert len(engine.list_adapters()) == NUM_ADAPTERS
    rng = random.Random(0)
    names = engine.list_adapters()
    weights = [1.0 / (rank + 1) for rank in range(NUM_ADAPTERS)]  # power law, alpha = 1
    adapters = rng.choices(names, weights=weights, k=1000)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randint(2, 12))] for _ in adapters]
    outputs = llm.generate(prompts, PARAMS, adapters=adapters)
    assert all(o.error is None and len(o.token_ids) == 6 for o in outputs)
    stats = engine.lora_stats()
    distinct = len(set(adapters))
    assert stats["evictions"] > 0 and stats["loads"] > distinct  # evicted adapters came back later
    assert stats["host_evictions"] > 0 and stats["disk_loads"] > distinct
    assert stats["resident"] * 6 < engine.pool.num_slots  # only a few dozen fit at once
    for index in rng.sample(range(len(prompts)), 12):  # a sample equals each request run alone
        assert llm.generate(prompts[index], PARAMS, adapters=adapters[index])[0].token_ids == outputs[index].token_ids


def test_a_refused_adapter_disturbs_no_running_request(tiny_llama_folder, adapter_dir, tmp_path):
    llm = LLM(model=str(tiny_llama_folder[1]), adapters={"good": str(adapter_dir / "a0001")})
    engine = llm.engine
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    expected = [llm.generate(p, PARAMS, adapters="good")[0].token_ids for p in prompts]
    ids = [engine.add_request(p, PARAMS, adapter="good") for p in prompts]
    engine.step()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json"):
        engine.add_adapter("broken", str(broken))
    finished = {}
    while engine.has_unfinished():
        finished.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert [finished[i] for i in ids] == expected
    assert engine.list_adapters() == ["good"]
