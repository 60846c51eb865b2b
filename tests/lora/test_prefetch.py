"""Adapters of waiting requests are loaded ahead, only into room the KV cache does not need, and change
no output."""

from __future__ import annotations

import pytest

from slora import LLM, SamplingParams
from slora.fixtures import write_adapter

PARAMS = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16], [17, 18, 19, 20], [21, 22]]


@pytest.fixture(scope="module")
def adapters(tiny_llama_arch, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("prefetch")
    return {f"a{i}": str(write_adapter(root / f"a{i}", tiny_llama_arch, 4, ["q_proj", "v_proj", "down_proj"], seed=i,
                                       alpha=8))
            for i in range(len(PROMPTS))}


def _llm(folder, adapters, prefetch: int, num_slots: int) -> LLM:
    return LLM(model=str(folder), adapters=adapters, num_slots=num_slots, max_num_seqs=2, adapter_prefetch=prefetch)


def test_waiting_requests_adapters_are_loaded_ahead(tiny_llama_folder, adapters):
    names = list(adapters)
    expected = [o.token_ids for o in _llm(tiny_llama_folder[1], adapters, 0, 1024).generate(PROMPTS, PARAMS, names)]
    llm = _llm(tiny_llama_folder[1], adapters, 3, 1024)
    engine = llm.engine
    for prompt, name in zip(PROMPTS, names):
        engine.add_request(prompt, PARAMS, adapter=name)
    engine.step()  # admits two; the adapters of the next two waiting (max_num_seqs) load while it runs
    assert engine.lora_stats()["prefetches"] == 2
    assert [engine.residency.is_resident(n) for n in names] == [True] * 4 + [False] * 2
    assert [engine.residency.get(n).references for n in names[2:4]] == [0, 0]  # idle: evictable
    while engine.has_unfinished():
        engine.step()
    stats = engine.lora_stats()
    assert stats["prefetches"] == 4 and stats["loads"] == 6 and stats["hits"] == 4  # each prefetch was used
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS, names)] == expected


def test_prefetch_takes_no_room_the_kv_cache_needs(tiny_llama_folder, adapters):
    """A pool with room for the running requests and one more adapter (each takes 28 of its 100 slots):
    prefetching loads only what fits beside the KV cache, preempts nothing, and the tokens are the same."""
    names = list(adapters)
    runs = {}
    for prefetch in (0, 4):
        llm = _llm(tiny_llama_folder[1], adapters, prefetch, 100)
        outputs = llm.generate(PROMPTS, PARAMS, names)
        runs[prefetch] = ([o.token_ids for o in outputs], llm.engine.scheduler.num_preemptions)
        assert all(o.error is None for o in outputs)
    assert 0 < llm.engine.lora_stats()["prefetches"] < 4  # some fit, not all
    assert runs[4] == runs[0]
