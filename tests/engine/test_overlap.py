"""Overlapped steps: a step's tokens stay on the device while the next step is issued.

What the overlap may cost and what it must not: a request whose last token is known in advance
(max_tokens) is never scheduled again, a request that samples a stop token is scheduled once more
and that step's slot is given back, and an abort while a token is pending loses nobody else's.
"""

from __future__ import annotations

import pytest

from slora import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_folder):
    return LLM(model=str(tiny_llama_folder[1]))


def _count_scheduled_tokens(engine) -> list[int]:
    """Tokens of every scheduled batch, per step, from the real scheduler."""
    counts: list[int] = []
    schedule = engine.scheduler.schedule

    def counting():
        batch = schedule()
        counts.append(sum(batch.num_new_tokens))
        return batch

    engine.scheduler.schedule = counting
    return counts


def _run(engine) -> dict[str, list[int]]:
    finished = {}
    while engine.has_unfinished():
        finished.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    return finished


def test_a_request_at_max_tokens_is_not_scheduled_again(llm):
    engine = llm.engine
    prompt, params = [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    counts = _count_scheduled_tokens(engine)
    try:
        request_id = engine.add_request(prompt, params)
        tokens = _run(engine)[request_id]
    finally:
        del engine.scheduler.schedule
    assert len(tokens) == 5
    # The prompt, then each generated token but the last fed back once: no step for the last token.
    assert sum(counts) == len(prompt) + 5 - 1
    assert engine.pool.stats().kv_slots == 0


def test_a_stop_token_costs_one_step_whose_slot_is_given_back(llm):
    engine = llm.engine
    prompt = [9, 10, 11, 12, 13]
    free_run = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].token_ids
    stop = free_run[3]
    first = free_run.index(stop)  # the stop token's first occurrence ends the request
    counts = _count_scheduled_tokens(engine)
    try:
        request_id = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop]))
        tokens = _run(engine)[request_id]
    finally:
        del engine.scheduler.schedule
    assert tokens == free_run[: first + 1]
    # The step after the stop token was issued before the token was read back: one token's work wasted.
    assert sum(counts) == len(prompt) + (first + 1)
    assert engine.pool.stats().kv_slots == 0


def test_an_abort_while_a_token_is_pending_leaves_the_others_unchanged(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[20, 21, 22], [30, 31, 32, 33]]
    expected = llm.generate(prompts[1], params)[0].token_ids
    doomed = engine.add_request(prompts[0], params)
    kept = engine.add_request(prompts[1], params)
    engine.step()
    engine.step()  # both have a token on the device now
    assert all(r.pending_tokens == 1 for r in engine.scheduler.running)
    engine.abort(doomed)
    finished = _run(engine)
    assert finished == {kept: expected}
    assert engine.pool.stats().kv_slots == 0


def test_a_request_that_outgrows_the_pool_keeps_its_pending_token_and_is_reported(tiny_llama_folder, llm):
    """Alone and out of slots, a request ends with "length"; the token still on the device is its last."""
    prompt, params = [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    unbounded = llm.generate(prompt, params)[0].token_ids
    small = LLM(model=str(tiny_llama_folder[1]), num_slots=12)
    out = small.generate(prompt, params)[0]  # raised KeyError when the finish went unreported
    # Every token but the last needs a slot: the pool holds the prompt and 8 generated tokens.
    assert out.finish_reason == "length" and out.token_ids == unbounded[: small.engine.pool.num_slots - len(prompt) + 1]
    assert small.engine.pool.stats().kv_slots == 0
