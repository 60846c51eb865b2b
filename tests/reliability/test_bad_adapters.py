"""Bad adapters, through /v1/load_lora_adapter (4xx naming the problem, nothing else changes) and
through start-up flags (the server refuses to start, naming the file); and a NaN adapter that is
only found when first used (--no-check-adapter-weights) fails its own requests alone."""

from __future__ import annotations

import concurrent.futures
import shutil

import httpx
import pytest

from slora.cli import main as slora_main
from slora.server.app import ServerOptions, build_app
from slora.fixtures import write_adapter
from tests.reliability.adapters import BAD_ADAPTERS, CONFINEMENT_ONLY
from tests.reliability.conftest import assert_still_correct, engine_config, serving, state, wait_idle


@pytest.mark.parametrize("kind", list(BAD_ADAPTERS))
def test_a_bad_adapter_loaded_at_run_time_gets_a_4xx_naming_the_problem(limited, greedy_reference, kind):
    before = wait_idle(limited)
    models = httpx.get(limited.url + "/v1/models").json()
    response = httpx.post(limited.url + "/v1/load_lora_adapter", json={"lora_name": kind, "lora_path": f"bad-{kind}"},
                          timeout=30)
    assert response.status_code in (400, 403), response.text
    error = response.json()["error"]
    assert BAD_ADAPTERS[kind][1] in error["message"] and error["param"] == "lora_path"
    assert f"bad-{kind}" in error["message"] or "adapter_model" in error["message"]
    assert httpx.get(limited.url + "/v1/models").json() == models  # nothing else changed
    assert state(limited) == before
    response = httpx.post(limited.url + "/v1/completions", json={"model": kind, "prompt": "x", "max_tokens": 1})
    assert response.status_code == 404


def test_the_server_serves_correctly_after_every_bad_adapter(limited, greedy_reference, reliability_root):
    for kind in BAD_ADAPTERS:
        response = httpx.post(limited.url + "/v1/load_lora_adapter", timeout=30,
                              json={"lora_name": f"again-{kind}", "lora_path": str(reliability_root / f"bad-{kind}")})
        assert 400 <= response.status_code < 500
    assert_still_correct(limited, greedy_reference)
    response = httpx.post(limited.url + "/v1/load_lora_adapter", json={"lora_name": "ok", "lora_path": "churn"})
    assert response.status_code == 200, response.text
    assert httpx.post(limited.url + "/v1/completions", json={"model": "ok", "prompt": "x", "max_tokens": 2}).status_code == 200
    assert httpx.post(limited.url + "/v1/unload_lora_adapter", json={"lora_name": "ok"}).status_code == 200
    wait_idle(limited)


@pytest.mark.parametrize("kind", [k for k in BAD_ADAPTERS if k not in CONFINEMENT_ONLY])
def test_a_bad_adapter_given_at_start_up_stops_the_start_naming_the_file(chat_model, reliability_root, kind):
    config = engine_config(chat_model, reliability_root, adapters={"bad": str(reliability_root / f"bad-{kind}")})
    with pytest.raises(ValueError) as refused:
        build_app(config, ServerOptions())
    message = str(refused.value)
    assert f"bad-{kind}" in message and BAD_ADAPTERS[kind][1] in message


@pytest.mark.parametrize("kind", ["folder-link-outside", "weights-link-outside", "10000-files", "nan"])
def test_a_bad_adapter_inside_lora_dir_stops_the_start(chat_model, reliability_root, chat_arch, tmp_path, kind):
    lora_dir = tmp_path / "lora-dir"
    write_adapter(lora_dir / "good", chat_arch)
    source = reliability_root / f"bad-{kind}"
    if source.is_symlink():
        (lora_dir / "bad").symlink_to(source.resolve(), target_is_directory=True)
    else:
        shutil.copytree(source, lora_dir / "bad", symlinks=True)
    config = engine_config(chat_model, reliability_root, adapters={}, lora_dir=str(lora_dir))
    with pytest.raises(ValueError, match=BAD_ADAPTERS[kind][1]):
        build_app(config, ServerOptions())


def test_slora_serve_exits_2_with_the_message(chat_model, reliability_root, capsys):
    code = slora_main(["serve", "--model", str(chat_model[1]), "--num-slots", "4096",
                       "--lora", f"bad={reliability_root / 'bad-rank-mismatch'}"])
    assert code == 2
    assert "bad-rank-mismatch/adapter_model.safetensors" in capsys.readouterr().err


def test_a_nan_adapter_found_on_first_use_fails_its_requests_alone(chat_model, reliability_root):
    adapters = {"r00": str(reliability_root / "r00"), "nan": str(reliability_root / "bad-nan")}
    config = engine_config(chat_model, reliability_root, adapters=adapters)
    with serving(config, ServerOptions(check_adapter_weights=False)) as running:
        good = {"model": "r00", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        want = httpx.post(running.url + "/v1/completions", json=good, timeout=60).json()["choices"][0]["text"]
        bad = good | {"model": "nan"}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(httpx.post, running.url + "/v1/completions", json=bad if i % 3 == 0 else good,
                                   timeout=60) for i in range(12)]
            responses = [f.result() for f in futures]
        for i, response in enumerate(responses):
            if i % 3 == 0:
                error = response.json()["error"]
                assert response.status_code == 500 and "bad-nan/adapter_model.safetensors" in error["message"]
                assert "non-finite" in error["message"] and error["type"] == "server_error"
            else:
                assert response.status_code == 200 and response.json()["choices"][0]["text"] == want
        assert wait_idle(running)["adapter_slots"] > 0  # r00 stays resident; nan never became resident
        assert running.app.state.server.engine.engine.residency.resident_names() == ["r00"]
