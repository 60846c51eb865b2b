"""Continuous batching, preemption, sampling options and bad input, on a tiny random Llama."""

from __future__ import annotations

import random

import pytest

from slora import LLM, SamplingParams
from slora.models.loader import ModelLoadError

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _prompts(count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randint(low, high))] for _ in range(count)]


def _alone(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [llm.generate(p, params)[0].token_ids for p in prompts]


@pytest.fixture(scope="module")
def llm(tiny_llama_folder):
    return LLM(model=str(tiny_llama_folder[1]))


def test_requests_joining_while_others_decode_give_the_same_tokens(llm):
    prompts = _prompts(6, 1, 40)
    expected = _alone(llm, prompts, GREEDY)
    engine = llm.engine
    finished: dict[str, list[int]] = {}
    ids = []
    for prompt in prompts:  # a new request arrives every two steps, while earlier ones decode
        ids.append(engine.add_request(prompt, GREEDY))
        for _ in range(2):
            finished.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert len(engine.scheduler.running) > 1
    while engine.has_unfinished():
        finished.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert [finished[i] for i in ids] == expected


def test_a_full_pool_preempts_and_recomputes_without_changing_tokens(tiny_llama_folder):
    prompts = _prompts(8, 20, 40, seed=1)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    small = LLM(model=str(tiny_llama_folder[1]), num_slots=160)
    expected = _alone(small, prompts, params)
    outputs = small.generate(prompts, params)
    assert [o.token_ids for o in outputs] == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.pool.stats().used_slots == 0


def test_reserve_admission_never_preempts_and_still_batches(tiny_llama_folder):
    """S-LoRA's admission on the pool that made the optimistic one preempt: a request starts only if
    every running one can reach max_tokens, so nothing is recomputed, yet sequences share steps, and
    requests ending early (a short max_tokens) make room for the next ones."""
    prompts = _prompts(8, 20, 40, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=30 if i % 3 else 4, ignore_eos=True) for i in range(8)]
    llm = LLM(model=str(tiny_llama_folder[1]), num_slots=160, admission="reserve")
    expected = [llm.generate(p, q)[0].token_ids for p, q in zip(prompts, params)]
    scheduler = llm.engine.scheduler
    schedule, most_running = scheduler.schedule, []

    def counting():
        batch = schedule()
        most_running.append(len(scheduler.running))
        return batch

    scheduler.schedule = counting
    outputs = llm.generate(prompts, params)
    assert [o.token_ids for o in outputs] == expected
    assert scheduler.num_preemptions == 0 and max(most_running) > 1
    assert llm.engine.pool.stats().used_slots == 0


def test_a_forward_pass_out_of_device_memory_is_retried_smaller_without_changing_tokens(tiny_llama_folder,
                                                                                       monkeypatch):
    """A "device" that holds at most 12 tokens a pass: every larger pass raises OutOfMemoryError. The
    engine undoes it, preempts half of the batch, halves its step limits and goes on; no request fails
    and every one gives the tokens it gives alone."""
    import torch

    prompts = _prompts(6, 5, 30, seed=2)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(model=str(tiny_llama_folder[1]))
    expected = _alone(llm, prompts, params)
    engine = llm.engine
    real_model = engine.model
    largest = []

    def model(batch):
        if batch.input_ids.numel() > 12:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        largest.append(batch.input_ids.numel())
        return real_model(batch)

    monkeypatch.setattr(engine, "model", model)
    outputs = llm.generate(prompts, params)
    assert [o.error for o in outputs] == [None] * len(prompts)
    assert [o.token_ids for o in outputs] == expected
    back_offs = engine.step_stats()["out_of_memory_back_offs"]
    assert back_offs > 0 and engine.scheduler.num_back_offs == back_offs and max(largest) == 12
    assert engine.pool.stats().used_slots == engine.pool.stats().adapter_slots == 0


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_samples(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12, n=3, ignore_eos=True)
    first = llm.generate([[5, 6, 7]], params)[0]
    again = llm.generate([[5, 6, 7]], params)[0]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) == 3


def test_logprobs_hold_the_sampled_token_and_the_top_k(llm):
    output = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0]
    assert len(output.logprobs) == len(output.token_ids)
    for token, entry in zip(output.token_ids, output.logprobs):
        assert token in entry and len(entry) >= 3
        assert entry[token] == max(entry.values())  # greedy picks the most likely token


def test_stop_token_ids_and_max_tokens_finish_requests(llm):
    free = llm.generate([[9, 10]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    stop_at = free.token_ids[3]
    stopped = llm.generate([[9, 10]], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]


def test_abort_frees_the_slots(llm):
    engine = llm.engine
    request_id = engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=100))
    engine.step()
    assert engine.pool.stats().kv_slots > 0
    engine.abort(request_id)
    assert engine.pool.stats().kv_slots == 0 and not engine.has_unfinished()


def test_bad_prompts_fail_alone_with_a_clear_error(llm):
    too_long = [5] * llm.engine.max_model_len
    outputs = llm.generate([[5, 6], [], [5, 10**6], too_long, [7, 8]], SamplingParams(temperature=0, max_tokens=3))
    assert [o.finish_reason for o in outputs] == ["length", "error", "error", "error", "length"]
    assert "empty" in outputs[1].error
    assert "outside the vocabulary" in outputs[2].error
    assert "context" in outputs[3].error
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_unknown_model_path_and_corrupt_weights_are_named(tmp_path, tiny_llama_folder):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(model=str(tmp_path / "nowhere"))
    folder = tmp_path / "corrupt"
    folder.mkdir()
    source = tiny_llama_folder[1]
    (folder / "config.json").write_bytes((source / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(model=str(folder))
    with pytest.raises(ModelLoadError, match="unknown dummy model"):
        LLM(model="dummy:nope")
