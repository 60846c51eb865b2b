"""Schemathesis against the server's own OpenAPI document: requests that fit every route's schema
and requests that break it, a bounded number per route: never a 5xx, never a hang."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode

from tests.reliability.conftest import assert_still_correct, wait_idle

EXAMPLES = 25 * int(os.environ.get("SLORA_FUZZ", "1"))
SERVED_MODELS = ("tiny", "r00", "r02")


@pytest.fixture(scope="module")
def operations(limited):
    schema = schemathesis.openapi.from_url(limited.url + "/openapi.json")
    found = [result.ok() for result in schema.get_all_operations()]
    return {f"{op.method.upper()} {op.path}": op for op in found}


def test_the_openapi_document_describes_every_body(operations):
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/load_lora_adapter",
            "POST /v1/unload_lora_adapter", "GET /v1/models", "GET /health"} <= set(operations)
    assert operations["POST /v1/completions"].body  # the request body is documented, not free-form


POST_ROUTES = ["POST /v1/completions", "POST /v1/chat/completions", "POST /v1/load_lora_adapter",
               "POST /v1/unload_lora_adapter"]
CASES = [(route, mode) for route in POST_ROUTES for mode in GenerationMode] + [("GET /v1/models", GenerationMode.POSITIVE)]


@pytest.mark.parametrize("route, mode", CASES, ids=[f"{r}-{m.value}" for r, m in CASES])
def test_generated_requests_never_get_a_5xx(limited, operations, greedy_reference, route, mode):
    operation = operations[route]
    counter = iter(range(10**9))
    statuses: list[int] = []  # (the generated bodies mostly break a limit: tests/reliability/test_bad_requests.py
    # generates right requests with a few wrong fields, which reach the engine)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=os.environ.get("SLORA_FUZZ") is None)
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        count = next(counter)
        if isinstance(case.body, dict) and "model" in case.body and count % 4:
            case.body["model"] = SERVED_MODELS[count % 3]  # reach the engine, not only the 404
        if isinstance(case.body, dict) and case.body.get("lora_name") in ("r00", "r01", "r02", "r03"):
            case.body["lora_name"] = "not-" + case.body["lora_name"]  # keep the served adapters served
        response = case.call(base_url=limited.url, timeout=60)
        assert response.status_code < 500, (case.body, response.status_code, response.text[:300])
        statuses.append(response.status_code)

    check()
    assert statuses and all(s < 500 for s in statuses)
    wait_idle(limited)
    assert_still_correct(limited, greedy_reference)
