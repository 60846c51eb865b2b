"""Bad requests, generated: any body gets an answer (4xx for what is wrong, never 5xx, never a hang),
bodies past --max-body-size get 413 before they are parsed, and the server answers the known
greedy request exactly as before."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import MAX_BODY, assert_still_correct, wait_idle

TIMEOUT = httpx.Timeout(60.0)  # a hang fails the test instead of stalling it
# Clients below open a connection per call: see test_faults.py on keep-alive stalls of ~40 ms.
SCALE = int(os.environ.get("SLORA_FUZZ", "1"))  # SLORA_FUZZ=20: random seeds, 20x the examples
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=os.environ.get("SLORA_FUZZ") is None, database=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
small_ints = st.integers(min_value=-3, max_value=40)
huge_ints = st.integers(min_value=-(2**80), max_value=2**80)
odd_floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([5e-324, 1e-300, 1e300, -0.0])
texts = st.text(max_size=40) | st.sampled_from(["\ud800", "word " * 400, "\x00", "😀" * 30])
token_ids = st.lists(st.integers(min_value=-5, max_value=60_000) | huge_ints, min_size=0, max_size=24)


# Values of each field that are wrong, odd or extreme (and some right ones).
WILD = {
    "model": st.sampled_from(["tiny", "r00", "nope", "", "tiny "]) | json_values,
    "stream": st.booleans() | json_values,
    "n": small_ints | huge_ints | json_values,
    "max_tokens": small_ints | st.integers(100, 10**6) | huge_ints | json_values,
    "temperature": odd_floats | json_values,
    "top_p": odd_floats | json_values,
    "top_k": small_ints | huge_ints | json_values,
    "seed": huge_ints | json_values,
    "stop": texts | st.lists(texts, max_size=40) | json_values,
    "stop_token_ids": token_ids | json_values,
    "presence_penalty": odd_floats | json_values,
    "frequency_penalty": odd_floats | json_values,
    "repetition_penalty": odd_floats | st.floats(0.5, 2) | json_values,
    "min_tokens": small_ints | huge_ints | json_values,
    "ignore_eos": json_values,
    "logit_bias": st.dictionaries(st.text(max_size=4), odd_floats, max_size=2) | json_values,
    "best_of": small_ints | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}) | json_values,
    "user": texts | json_values,
}
COMPLETION_WILD = WILD | {
    "prompt": texts | token_ids | st.lists(texts, max_size=6) | st.lists(token_ids, max_size=6)
    | st.just([[1, 2]] * 300) | json_values,
    "logprobs": small_ints | json_values,
    "echo": st.booleans() | json_values,
}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "developer"]),
                                 "content": texts | st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "image_url"]), "text": texts}), max_size=3)})
CHAT_WILD = WILD | {
    "messages": st.lists(MESSAGE, max_size=5) | st.just([{"role": "user", "content": "x " * 2000}]) | json_values,
    "logprobs": st.booleans() | json_values,
    "top_logprobs": small_ints | json_values,
    "max_completion_tokens": small_ints | huge_ints | json_values,
    "tools": st.lists(json_values, max_size=2),
}

# A request that is right, with some of the optional fields that change sampling and stopping.
VALID = {
    "model": st.sampled_from(["tiny", "r00", "r01", "r02", "r03"]),
    "max_tokens": st.integers(1, 16),
    "temperature": st.sampled_from([0, 0.5, 1.0]),
    "top_p": st.floats(0.1, 1.0),
    "top_k": st.integers(-1, 40),
    "seed": st.integers(0, 2**32),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3),
    "min_tokens": st.integers(0, 1),
    "ignore_eos": st.booleans(),
    "repetition_penalty": st.floats(0.8, 1.3),
}
VALID_COMPLETION = VALID | {
    "prompt": st.text(min_size=1, max_size=30) | st.lists(st.integers(0, 500), min_size=1, max_size=12),
    "logprobs": st.integers(0, 3),
}
VALID_CHAT = VALID | {"messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=20)}), min_size=1, max_size=3)}


def bodies(valid: dict[str, st.SearchStrategy], wild: dict[str, st.SearchStrategy], required: str):
    """A right request, then 0-3 fields set to wild values (or dropped, or unknown ones added)."""
    always = ("model", "max_tokens", required)  # max_tokens: unset, a generation runs to --max-total-tokens
    base = st.fixed_dictionaries({k: valid[k] for k in always},
                                 optional={k: v for k, v in valid.items() if k not in always})
    changes = st.lists(st.tuples(st.sampled_from(sorted(wild)), st.integers(0, 9)), max_size=3)

    @st.composite
    def body(draw):
        data = draw(base)
        for name, how in draw(changes):
            if how == 0:
                data.pop(name, None)
            elif how == 1:
                data[draw(st.text(max_size=10))] = draw(json_values)
            else:
                data[name] = draw(wild[name])
        return data

    return body()


def check_answer(response: httpx.Response) -> None:
    """4xx with an OpenAI error body, or 200 with a well-formed answer: never a 5xx."""
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"]
        return
    assert response.status_code == 200
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert all("error" not in json.loads(e) for e in events[:-1]), events
    else:
        assert json.loads(response.text)["choices"], response.text[:500]


def send(client: httpx.Client, endpoint: str, body: dict) -> int:
    response = client.post(f"/v1/{endpoint}", content=json.dumps(body).encode(),  # ASCII: \ud800 stays escaped
                           headers={"content-type": "application/json"})
    try:
        check_answer(response)
    except AssertionError as failure:
        raise AssertionError(f"{failure} for the body {body!r}") from None
    return response.status_code


@pytest.fixture(scope="module")
def client(limited, greedy_reference):
    with httpx.Client(base_url=limited.url, timeout=TIMEOUT, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        yield http
    assert_still_correct(limited, greedy_reference)  # after every test of this module
    wait_idle(limited)


@settings(max_examples=120 * SCALE, **SETTINGS)
@given(body=bodies(VALID_COMPLETION, COMPLETION_WILD, "prompt"))
def test_generated_completion_bodies_get_4xx_or_a_correct_answer(client, body):
    event(f"status {send(client, 'completions', body)}")


@settings(max_examples=80 * SCALE, **SETTINGS)
@given(body=bodies(VALID_CHAT, CHAT_WILD, "messages"))
def test_generated_chat_bodies_get_4xx_or_a_correct_answer(client, body):
    event(f"status {send(client, 'chat/completions', body)}")


@settings(max_examples=60 * SCALE, **SETTINGS)
@given(raw=st.binary(max_size=200) | st.text(max_size=100).map(str.encode),
       endpoint=st.sampled_from(["completions", "chat/completions", "load_lora_adapter", "unload_lora_adapter"]))
def test_arbitrary_bytes_get_400(client, raw, endpoint):
    response = client.post(f"/v1/{endpoint}", content=raw, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text


@settings(max_examples=40 * SCALE, **SETTINGS)
@given(name=json_values | texts, path=json_values | texts | st.sampled_from(["..", "/", "/proc/self", "r00/..//"]))
def test_generated_adapter_loads_get_4xx(client, name, path):
    body = json.dumps({"lora_name": name, "lora_path": path}).encode()
    response = client.post("/v1/load_lora_adapter", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text


@pytest.mark.parametrize("body, param", [
    (b'{"model": "tiny", "prompt": "\xff\xfe caf\xc3"}', None),  # invalid UTF-8 inside a string
    (b'{"model": "tiny", "prompt": "a", "temperature": NaN}', None),
    (b'{"model": "tiny", "prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", None),
    (b"[" * 5000 + b"]" * 5000, None),
    (json.dumps({"model": "tiny", "prompt": list(range(5, 400))}).encode(), "prompt"),  # past --max-prompt-tokens
    (json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 10**6}).encode(), "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "hi", "n": 5}).encode(), "n"),  # past --max-n
    (json.dumps({"model": "tiny", "prompt": [[1, 2]] * 300}).encode(), "prompt"),
    (json.dumps({"model": "tiny", "prompt": "hi", "stop": ["x"] * 100}).encode(), "stop"),
    (json.dumps({"model": "tiny", "prompt": "hi", "stop_token_ids": [10**6], "min_tokens": 2}).encode(),
     "stop_token_ids"),
    (json.dumps({"model": "tiny", "prompt": [-1, 2**40]}).encode(), "prompt"),
    (json.dumps({"model": "tiny", "prompt": "hi", "seed": 2**64}).encode(), "seed"),
    (json.dumps({"model": "tiny", "prompt": "hi", "top_k": 2**64}).encode(), "top_k"),
    (json.dumps({"model": "tiny", "prompt": "hi", "repetition_penalty": 1e-300}).encode(), "repetition_penalty"),
    (json.dumps({"model": "tiny", "prompt": "hi", "temperature": 1e300}).encode(), "temperature"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x " * 3000}]}).encode(), "messages"),
])
def test_known_bad_bodies_get_400_naming_the_parameter(client, body, param):
    endpoint = "chat/completions" if b'"messages"' in body else "completions"
    response = client.post(f"/v1/{endpoint}", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_tiny_positive_temperature_is_greedy(client, greedy_reference):
    from tests.reliability.conftest import GREEDY

    response = client.post("/v1/completions", json=GREEDY | {"temperature": 1e-30})
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == greedy_reference


def test_a_body_past_max_body_size_gets_413_before_parsing(client):
    big = json.dumps({"model": "tiny", "prompt": "x" * MAX_BODY}).encode()
    response = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    response = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "--max-body-size" in response.json()["error"]["message"]
    junk = b"\xff" * (MAX_BODY + 1)  # not even JSON: still 413, it is never parsed
    response = client.post("/v1/load_lora_adapter", content=junk)
    assert response.status_code == 413
