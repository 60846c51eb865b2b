"""Overload: open-loop bursts of several times what the server holds at once. Every request is
answered before its deadline (served correctly, or 503/429 with Retry-After), and the server returns
to its idle state (no request, no KV slot, nothing admitted, memory flat) afterwards."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from slora import LLM, SamplingParams
from slora.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.server.app import ServerOptions
from tests.reliability.conftest import (MAX_NUM_SEQS, MAX_QUEUE, assert_still_correct, good_adapters, rss_bytes,
                                        serving, state, wait_idle)

DEADLINE_S = 90.0
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,", "Dear diary,"]


async def burst(url: str, bodies: list[dict], headers: dict[str, str] | None = None) -> list[tuple[int, str, dict]]:
    """Send every body at once (open loop); (status, text, headers) of each, or fail past the deadline."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)

    async def one(client: httpx.AsyncClient, body: dict) -> tuple[int, str, dict]:
        if body.get("stream"):
            async with client.stream("POST", "/v1/completions", json=body) as response:
                text = "".join([line async for line in response.aiter_lines()])
                return response.status_code, text, dict(response.headers)
        response = await client.post("/v1/completions", json=body)
        return response.status_code, response.text, dict(response.headers)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=DEADLINE_S, headers=headers) as client:
        return await asyncio.wait_for(asyncio.gather(*(one(client, b) for b in bodies)), DEADLINE_S)


def streamed_text(text: str) -> str:
    chunks = [json.loads(part) for part in text.split("data: ")[1:] if part.strip() and part.strip() != "[DONE]"]
    assert all("error" not in c for c in chunks), chunks
    return "".join(c["choices"][0]["text"] for c in chunks)


def test_a_burst_of_3x_capacity_is_served_or_refused_with_retry_after(limited, greedy_reference, chat_model,
                                                                      reliability_root):
    capacity = MAX_NUM_SEQS + MAX_QUEUE
    models = ["tiny", "r00", "r01", "r02", "r03"]
    bodies = [{"model": models[i % 5], "prompt": PROMPTS[i % 4], "max_tokens": 16, "temperature": 0,
               "ignore_eos": True, "stream": i % 2 == 1} for i in range(3 * capacity)]
    bad = [{"model": "tiny", "prompt": "hi", "max_tokens": 10**6}, {"model": "r00", "prompt": [10**9]},
           {"model": "tiny", "prompt": "word " * 300}, {"model": "tiny", "prompt": "hi", "stop_token_ids": [10**7]}]
    bodies[capacity::capacity // 4] = [b | {"bad": True} for b in bad * 3][: len(bodies[capacity::capacity // 4])]
    oracle = LLM(model=str(chat_model[1]), num_slots=8192, adapters=good_adapters(reliability_root))
    want = {(m, p): o.text for m in models for p, o in
            zip(PROMPTS, oracle.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                         adapters=None if m == "tiny" else m))}
    for model in models:  # idle means: every adapter resident, as after any burst over all of them
        assert httpx.post(limited.url + "/v1/completions", json=bodies[0] | {"model": model, "stream": False},
                          timeout=60).status_code == 200
    idle, memory = wait_idle(limited), rss_bytes()
    for _ in range(2):  # twice: the second burst finds the server exactly as the first left it
        results = asyncio.run(burst(limited.url, [{k: v for k, v in b.items() if k != "bad"} for b in bodies]))
        served = refused = 0
        for body, (status, text, headers) in zip(bodies, results):
            if body.get("bad"):  # found bad even when the server is full: 400, not 503
                assert status == 400, text
            elif status == 503:
                refused += 1
                assert headers["retry-after"] == "1" and "queue_full" in text
            else:
                assert status == 200, text
                served += 1
                got = streamed_text(text) if body["stream"] else json.loads(text)["choices"][0]["text"]
                assert got == want[(body["model"], body["prompt"])]
        assert served >= capacity // 2 and refused >= capacity, (served, refused)
        assert wait_idle(limited) == idle
    assert rss_bytes() - memory < 64 << 20
    assert_still_correct(limited, greedy_reference)


@pytest.fixture(scope="module")
def keyed():
    config = EngineConfig(model="dummy:tiny", pool=PoolConfig(num_slots=8192), scheduler=SchedulerConfig(max_num_seqs=2))
    with serving(config, ServerOptions(api_key="k", max_concurrency_per_key=4, max_queue=None)) as running:
        yield running


def test_past_max_concurrency_per_key_calls_get_429_with_retry_after(keyed):
    body = {"model": "dummy:tiny", "prompt": [5, 6, 7], "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    results = asyncio.run(burst(keyed.url, [body] * 24, {"Authorization": "Bearer k"}))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) >= 4 and statuses.count(429) >= 12, statuses
    assert set(statuses) == {200, 429}
    outputs = {text for status, text, _ in results if status == 200}
    assert len({json.dumps(json.loads(t)["choices"]) for t in outputs}) == 1  # all served answers agree
    for status, text, headers in results:
        if status == 429:
            assert headers["retry-after"] == "1" and "--max-concurrency-per-key" in text
    assert wait_idle(keyed)["kv_slots"] == 0 and keyed.app.state.server.engine.snapshot.running == 0
    response = httpx.post(keyed.url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"}, timeout=60)
    assert response.status_code == 200  # the key's count went back to zero
    assert state(keyed)["in_flight"] == 0
