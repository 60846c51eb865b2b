"""The OpenAI API through a real server and the official client: same outputs as the offline API,
streaming, n, logprobs, concurrency over adapters, errors, run-time adapters, disconnects, metrics."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from slora import SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def metrics(server) -> dict[str, float]:
    """Samples of /metrics as {'name{label=value,...}': value}."""
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def greedy(max_tokens: int = 8, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


# --- outputs ---------------------------------------------------------------------------------------
def test_models_lists_the_base_model_and_every_adapter_with_its_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert models["tiny"].parent is None
    assert {f"a{i:02d}" for i in range(16)} <= set(models)
    assert all(models[f"a{i:02d}"].parent == "tiny" for i in range(16))


@pytest.mark.parametrize("model", ["tiny", "a05"])
def test_completions_greedy_equal_the_offline_api_with_logprobs(client, offline, model):
    adapter = None if model == "tiny" else model
    expected = offline.generate(PROMPTS, greedy(logprobs=2), adapters=adapter)
    got = client.completions.create(model=model, prompt=PROMPTS, max_tokens=8, temperature=0, logprobs=2)
    assert [c.index for c in got.choices] == [0, 1, 2]
    for choice, want in zip(got.choices, expected):
        assert choice.text == want.text and choice.finish_reason == want.finish_reason
        assert choice.logprobs.token_logprobs == pytest.approx([e[t] for t, e in zip(want.token_ids, want.logprobs)],
                                                               abs=1e-4)
        assert all(len(top) in (2, 3) for top in choice.logprobs.top_logprobs)
    assert got.usage.completion_tokens == sum(len(o.token_ids) for o in expected)
    assert got.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)


def test_token_id_prompts_equal_text_prompts(client, offline):
    ids = offline.tokenizer.encode(PROMPTS[0])
    by_ids = client.completions.create(model="a01", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model="a01", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


@pytest.mark.parametrize("model", ["tiny", "a10"])
def test_chat_greedy_equals_the_offline_api_and_streaming_equals_not(client, offline, model):
    want = offline.chat(CHAT, greedy(ignore_eos=True), adapters=None if model == "tiny" else model)[0]
    got = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids) and got.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == got.usage.model_dump()


def test_n_with_a_seed_equals_the_offline_api_streamed_or_not(client, offline):
    params = SamplingParams(temperature=1.0, seed=11, n=3, max_tokens=8, ignore_eos=True)
    want = [o.text for o in offline.generate(PROMPTS[1], params, adapters="a02")[0].outputs]
    kwargs = dict(model="a02", prompt=PROMPTS[1], n=3, seed=11, temperature=1.0, max_tokens=8,
                  extra_body={"ignore_eos": True})
    got = client.completions.create(**kwargs)
    assert [c.text for c in got.choices] == want and len(set(want)) > 1
    texts = [""] * 3
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == want


def test_chat_logprobs_and_top_logprobs(client, offline):
    want = offline.chat(CHAT, greedy(6, logprobs=3, ignore_eos=True), adapters="a03")[0]
    got = client.chat.completions.create(model="a03", messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3, extra_body={"ignore_eos": True})
    content = got.choices[0].logprobs.content
    want_logprobs = [e[t] for t, e in zip(want.token_ids, want.logprobs)]
    assert [c.logprob for c in content] == pytest.approx(want_logprobs, abs=1e-4)
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)
    assert "".join(c.token for c in content) == want.text


def test_64_concurrent_streams_over_16_adapters_complete_with_correct_output(server, offline):
    prompts = [f"Request {i}: {PROMPTS[i % 3]}" for i in range(64)]
    adapters = [f"a{i % 16:02d}" for i in range(64)]
    want = [o.text for o in offline.generate(prompts, greedy(4, ignore_eos=True), adapters=adapters)]

    async def one(client: openai.AsyncOpenAI, prompt: str, model: str) -> str:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p, m) for p, m in zip(prompts, adapters)))

    assert asyncio.run(main()) == want


# --- errors ----------------------------------------------------------------------------------------
GOOD_COMPLETION = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
GOOD_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
ERRORS = [  # (endpoint, changes to a good body, status, param)
    ("completions", {"model": "nope"}, 404, "model"),
    ("chat/completions", {"model": "nope"}, 404, "model"),
    ("completions", {"n": 0}, 400, "n"),
    ("completions", {"temperature": "hot"}, 400, "temperature"),
    ("completions", {"temperature": -1}, 400, "temperature"),
    ("completions", {"top_p": 0}, 400, "top_p"),
    ("completions", {"max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"logprobs": 50}, 400, "logprobs"),
    ("completions", {"presence_penalty": 3}, 400, "presence_penalty"),
    ("completions", {"stop": [""]}, 400, "stop"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": [10**9]}, 400, "prompt"),
    ("completions", {"prompt": None}, 400, "prompt"),
    ("completions", {"best_of": 3}, 400, "best_of"),
    ("completions", {"logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("completions", {"echo": True}, 400, "echo"),
    ("completions", {"frobnicate": 1}, 400, "frobnicate"),
    ("completions", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, 400, "response_format"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0].type"),
    ("chat/completions", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat/completions", {"max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("chat/completions", {"model": None}, 400, "model"),
]


@pytest.mark.parametrize("endpoint, change, status, param", ERRORS,
                         ids=[f"{e}-{next(iter(c))}={next(iter(c.values()))}"[:60] for e, c, _, _ in ERRORS])
def test_bad_requests_get_the_status_and_an_openai_error_naming_the_parameter(server, endpoint, change, status, param):
    body = (GOOD_COMPLETION if endpoint == "completions" else GOOD_CHAT) | change
    body = {k: v for k, v in body.items() if v is not None}
    response = httpx.post(f"{server.url}/v1/{endpoint}", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_routes_get_openai_errors(server, client):
    response = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny", "prompt": ',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = httpx.get(server.url + "/v1/nothing")
    assert response.status_code == 404 and "message" in response.json()["error"]
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=1)
    assert raised.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=CHAT, tools=[{"type": "function",
                                                                            "function": {"name": "f"}}])
    assert raised.value.body["param"] == "tools"


# --- run-time adapters -----------------------------------------------------------------------------
def test_load_an_adapter_while_requests_run_use_it_unload_it_then_404(server, client, offline, adapter_root):
    started, texts = threading.Event(), []

    def long_request() -> None:  # a stream on another adapter, running through the whole test
        for chunk in client.completions.create(model="a07", prompt=PROMPTS[2], max_tokens=800, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}):
            texts.append(chunk.choices[0].text)
            started.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    try:
        assert started.wait(10)
        response = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "late"})
        assert response.status_code == 200, response.text
        assert "late" in {m.id for m in client.models.list().data}
        got = client.completions.create(model="late", prompt=PROMPTS, max_tokens=8, temperature=0)
        assert [c.text for c in got.choices] == [o.text for o in offline.generate(PROMPTS, greedy(), adapters="late")]
        response = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "late"})
        assert response.status_code == 200, response.text
        assert thread.is_alive()  # all of this happened while the other request ran
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="late", prompt="x", max_tokens=1)
        response = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "late"})
        assert response.status_code == 404 and response.json()["error"]["param"] == "lora_name"
        response = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "a07"})
        assert response.status_code == 409  # in use by the running stream
    finally:
        thread.join()
    want = offline.generate(PROMPTS[2], greedy(800, ignore_eos=True), adapters="a07")[0].text
    assert "".join(texts) == want


def test_adapter_paths_outside_the_root_are_refused(server, adapter_root):
    outside = adapter_root.parent / "outside" / "escape"
    (adapter_root / "link-out").symlink_to(outside, target_is_directory=True)
    sneaky = adapter_root / "sneaky"
    sneaky.mkdir()
    for file in outside.iterdir():  # a folder inside whose files link outside
        (sneaky / file.name).symlink_to(file)
    for path, status in [(str(outside), 403), ("../outside/escape", 403), (f"{adapter_root}/../outside/escape", 403),
                         ("link-out", 403), ("sneaky", 403), ("missing", 400), ("/etc", 403), ("a\x00b", 400)]:
        response = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert response.status_code == status, (path, response.text)
        assert response.json()["error"]["param"] == "lora_path"
    bad = adapter_root / "broken"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    response = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "broken"})
    assert response.status_code == 400 and "adapter_config.json" in response.json()["error"]["message"]
    response = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a00", "lora_path": "a01"})
    assert response.status_code == 400  # the name is taken


# --- disconnects and metrics -----------------------------------------------------------------------
def test_a_client_that_disconnects_mid_stream_frees_its_slots(server, client, offline):
    before = metrics(server)
    body = {"model": "a04", "prompt": PROMPTS[0], "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        during = metrics(server)
    assert during['slora_pool_slots_used{owner=kv}'] > 0 and during["slora_requests_running"] == 1
    deadline = time.monotonic() + 10
    while (now := metrics(server))["slora_pool_slots_used{owner=kv}"] > 0 or now["slora_requests_running"] > 0:
        assert time.monotonic() < deadline, "the aborted request still holds slots"
        time.sleep(0.05)
    assert now.get("slora_requests_finished_total{finish_reason=abort}", 0) == \
        before.get("slora_requests_finished_total{finish_reason=abort}", 0) + 1
    got = client.completions.create(model="a04", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert got.choices[0].text == offline.generate(PROMPTS[0], greedy(), adapters="a04")[0].text


def test_metrics_parse_and_move_with_the_load(server, client):
    before = metrics(server)
    client.completions.create(model="a08", prompt=PROMPTS, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    after = metrics(server)
    key = "slora_http_requests_total{route=/v1/completions,status=200}"
    assert after[key] == before.get(key, 0) + 1
    assert after["slora_generation_tokens_total"] == before["slora_generation_tokens_total"] + 15
    assert after["slora_time_to_first_token_seconds_count"] == before["slora_time_to_first_token_seconds_count"] + 3
    assert after["slora_inter_token_latency_seconds_count"] > before["slora_inter_token_latency_seconds_count"]
    assert after["slora_adapter_loads_total"] + after["slora_adapter_hits_total"] > \
        before["slora_adapter_loads_total"] + before["slora_adapter_hits_total"]
    assert after["slora_pool_slots_total"] > 0 and after["slora_adapters{state=registered}"] >= 16
    assert after["slora_engine_steps_total{mode=eager}"] > before["slora_engine_steps_total{mode=eager}"]
    assert after["slora_engine_steps_total{mode=cuda_graph}"] == 0 and after["slora_cuda_graphs_captured"] == 0  # CPU


def test_health_and_version(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert json.loads(httpx.get(server.url + "/version").text)["version"]
