#!/usr/bin/env python
"""Soak test: a real `slora serve` process under a mixed, bounded load, then a report (JSON).

    python scripts/soak.py --minutes 30            # the default model (SmolLM2-135M-Instruct)
    python scripts/soak.py --seconds 20 --tiny     # a tiny random Llama with SmolLM2's tokenizer
    python scripts/soak.py --seconds 20 --model DIR

The server runs in its own process (its memory is measured alone) on a free 127.0.0.1 port, with
small limits (8 running, 16 queued, 512 tokens per request, n <= 4, 256 KiB bodies) and 8 adapters
from --lora-dir, plus an adapter root for run-time loads. A few client threads then send, until the
time is up: good greedy requests across the adapters (completions and chat, streamed or not, each
answer compared with the one the idle server gave), bursts past the queue, bad requests (each must
get a 4xx), clients that disconnect mid-request, and one thread churning adapters (load, use,
unload a fresh name each time; and bad adapters, each refused with a 4xx). Every request has a
deadline; one with no answer by then, or whose connection failed unasked, is lost. At the end the
server must come back to idle; its memory and pool use before and after are reported, then it gets
SIGTERM and must exit cleanly.

Exit status 0 when nothing was lost, no bad input got a 5xx, no good request got a 5xx or a wrong
answer, and the server came back to idle.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEADLINE_S = 180.0  # a request unanswered by then is lost
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,", "Dear diary,", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 16
NUM_ADAPTERS = 8
LIMITS = {"--max-num-seqs": 8, "--max-queue": 16, "--max-total-tokens": 512, "--max-n": 4,
          "--max-body-size": 256 * 1024, "--num-slots": 16384}


# --- set-up: a model, adapters, a server ------------------------------------------------------------
def tiny_model(folder: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (as tests/server uses)."""
    from slora.fixtures import tiny_chat_model

    tiny_chat_model(folder)
    return folder


def model_arch(folder: Path):
    from slora.models.loader import read_architecture

    return read_architecture(folder)


def write_adapter(folder: Path, arch, rank: int, targets: tuple[str, ...], seed: int, value: float | None = None,
                  config: dict | None = None) -> Path:
    """A random LoRA adapter in PEFT's on-disk format; `value` goes into one weight (NaN: a bad one)."""
    from slora import fixtures

    tensors = fixtures.adapter_tensors(arch, rank, targets, seed, a_scale=0.05, b_scale=0.05)
    if value is not None:
        next(iter(tensors.values()))[0, 0] = value
    return fixtures.write_adapter(folder, arch, rank, targets, config=config, tensors=tensors)


def write_adapters(root: Path, model) -> list[str]:
    """root/served/s00..s07, root/churn, and root/bad-* (each refused for another reason)."""
    targets = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"))
    for i in range(NUM_ADAPTERS):
        write_adapter(root / "served" / f"s{i:02d}", model, (4, 8, 16)[i % 3], targets[i % 3], seed=i + 1)
    write_adapter(root / "churn", model, 8, targets[1], seed=100)
    write_adapter(root / "bad-nan", model, 4, targets[0], seed=1, value=float("nan"))
    write_adapter(root / "bad-rank", model, 4, targets[0], seed=1, config={"r": 8})
    write_adapter(root / "bad-dora", model, 4, targets[0], seed=1, config={"use_dora": True})
    write_adapter(root / "bad-truncated", model, 4, targets[0], seed=1)
    weights = root / "bad-truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (root / "bad-empty").mkdir()
    return ["bad-nan", "bad-rank", "bad-dora", "bad-truncated", "bad-empty", "../", "/etc", "served/../../"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str | None, root: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "slora.cli", "serve", "--port", str(port), "--host", "127.0.0.1",
               "--served-model-name", "base", "--lora-dir", str(root / "served"), "--adapter-root", str(root),
               "--log-level", "warning"]
    command += ["--model", model] if model else []
    for flag, value in LIMITS.items():
        command += [flag, str(value)]
    env = os.environ | {"SLORA_API_KEY": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_healthy(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError("the server was not ready in time")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)


# --- measuring ---------------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def engine_state(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    get = lambda name, **labels: int(samples.get((name, tuple(sorted(labels.items()))), 0))  # noqa: E731
    return {"running": get("slora_requests_running"), "waiting": get("slora_requests_waiting"),
            "kv_slots": get("slora_pool_slots_used", owner="kv"),
            "adapter_slots": get("slora_pool_slots_used", owner="adapter"),
            "free_slots": get("slora_pool_slots_free"), "registered_adapters": get("slora_adapters", state="registered")}


def sample_memory(pid: int, samples: list[float], end: float) -> None:
    while time.monotonic() < end:
        time.sleep(min(60.0, max(0.0, end - time.monotonic())))
        samples.append(rss_mb(pid))


def wait_idle(url: str, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        state = engine_state(url)
        if (state["running"], state["waiting"], state["kv_slots"]) == (0, 0, 0) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


# --- the load ----------------------------------------------------------------------------------------
class Tally:
    """Every sent request ends in exactly one outcome."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.latencies: list[float] = []

    SUCCESSES = ("served", "refused_cleanly", "bad_input_refused_4xx", "disconnected", "loaded", "unloaded", "used",
                 "bad_refused_4xx")

    def add(self, outcome: str, example: str = "", latency: float | None = None) -> None:
        with self.lock:
            self.counts[outcome] += 1
            if example and outcome not in self.examples and outcome not in self.SUCCESSES:
                self.examples[outcome] = example[:300]
            if latency is not None:
                self.latencies.append(latency)


class Load:
    def __init__(self, url: str, models: list[str], references: dict, end: float, tally: Tally, bad_adapters: list[str]):
        self.url, self.models, self.references, self.end, self.tally = url, models, references, end, tally
        self.bad_adapters = bad_adapters
        self.vocab_size = 0

    # One good request: served and equal to the idle server's answer, or refused with Retry-After.
    def good(self, client: httpx.Client, rng: random.Random) -> None:
        model = rng.choice(self.models)
        chat = model == "base" and rng.random() < 0.3
        prompt = rng.choice(PROMPTS)
        body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "stream": rng.random() < 0.5}
        body |= {"messages": CHAT} if chat else {"prompt": prompt}
        key = (model, "chat" if chat else prompt)
        started = time.monotonic()
        try:
            status, text = self.post(client, "/v1/chat/completions" if chat else "/v1/completions", body)
        except httpx.TransportError as error:
            return self.tally.add("lost", f"{type(error).__name__}: {error}")
        self.classify_good(status, text, key, body["stream"], chat, time.monotonic() - started)

    def classify_good(self, status: int, text: str, key: tuple, stream: bool, chat: bool, latency: float) -> None:
        if status in (429, 503):
            return self.tally.add("refused_cleanly" if "Retry-After" in text else "refused_without_retry_after")
        if status >= 500:
            return self.tally.add("good_5xx", text)
        if status != 200:
            return self.tally.add("good_unexpected_4xx", text)
        answer = self.answer_text(text, stream, chat)
        if answer is None:
            return self.tally.add("good_error_in_stream", text)
        if answer != self.references[key]:
            return self.tally.add("mismatched", f"{key}: {answer!r} != {self.references[key]!r}")
        self.tally.add("served", latency=latency)

    def post(self, client: httpx.Client, path: str, body: dict) -> tuple[int, str]:
        """(status, text); for 429/503 the text says whether Retry-After came with it."""
        if body.get("stream"):
            with client.stream("POST", path, json=body) as response:
                text = "".join(f"{line}\n" for line in response.iter_lines())
        else:
            response = client.post(path, json=body)
            text = response.text
        if response.status_code in (429, 503) and "retry-after" in response.headers:
            text += " Retry-After"
        return response.status_code, text

    @staticmethod
    def answer_text(text: str, stream: bool, chat: bool) -> str | None:
        if not stream:
            choice = json.loads(text)["choices"][0]
            return choice["message"]["content"] if chat else choice["text"]
        chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        if any("error" in c for c in chunks) or not text.rstrip().endswith("data: [DONE]"):
            return None
        pieces = [c["choices"][0]["delta"].get("content", "") if chat else c["choices"][0]["text"]
                  for c in chunks if c["choices"]]
        return "".join(pieces)

    # Sampled requests (n > 1, seeds): served or refused; not compared, but well-formed.
    def sampled(self, client: httpx.Client, rng: random.Random) -> None:
        body = {"model": rng.choice(self.models), "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, 48),
                "temperature": 0.8, "top_p": 0.9, "n": rng.randint(1, 4), "seed": rng.randint(0, 1000),
                "stop": ["\n\n"], "logprobs": 2}
        try:
            status, text = self.post(client, "/v1/completions", body)
        except httpx.TransportError as error:
            return self.tally.add("lost", f"{type(error).__name__}: {error}")
        if status == 200 and len(json.loads(text)["choices"]) == body["n"]:
            return self.tally.add("served")
        self.classify_good(status, text, None, False, False, 0.0) if status != 200 else self.tally.add("good_malformed", text)

    def bad(self, client: httpx.Client, rng: random.Random) -> None:
        path, content, headers = rng.choice(BAD_REQUESTS)(rng, self)
        try:
            response = client.post(path, content=content, headers=headers)
        except httpx.TransportError as error:
            return self.tally.add("lost", f"{type(error).__name__}: {error}")
        if 400 <= response.status_code < 500:
            return self.tally.add("bad_input_refused_4xx")
        self.tally.add("bad_input_5xx" if response.status_code >= 500 else "bad_input_accepted",
                       f"{content[:120]!r} -> {response.status_code} {response.text}")

    def disconnect(self, client: httpx.Client, rng: random.Random) -> None:
        body = {"model": rng.choice(self.models), "prompt": rng.choice(PROMPTS), "max_tokens": 200,
                "ignore_eos": True, "temperature": 0.5}
        try:
            if rng.random() < 0.5:
                with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
                    for _, _ in zip(range(rng.randint(1, 4)), response.iter_lines()):
                        pass
            else:
                with contextlib.suppress(httpx.TimeoutException):
                    client.post("/v1/completions", json=body, timeout=rng.uniform(0.05, 0.5))
        except httpx.TransportError as error:
            return self.tally.add("lost", f"{type(error).__name__}: {error}")
        self.tally.add("disconnected")

    def burst(self, client: httpx.Client, rng: random.Random) -> None:
        """More at once than the server holds (8 running + 16 queued): some must get 503."""
        threads = [threading.Thread(target=self.good, args=(client, random.Random(rng.random()))) for _ in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def client_thread(self, seed: int) -> None:
        rng = random.Random(seed)
        limits = httpx.Limits(max_connections=64)
        with httpx.Client(base_url=self.url, timeout=DEADLINE_S, limits=limits) as client:
            while time.monotonic() < self.end:
                roll = rng.random()
                if roll < 0.5:
                    self.good(client, rng)
                elif roll < 0.6:
                    self.sampled(client, rng)
                elif roll < 0.8:
                    self.bad(client, rng)
                elif roll < 0.97:
                    self.disconnect(client, rng)
                else:
                    self.burst(client, rng)

    def churn_thread(self, adapters: Tally, reference: str) -> None:
        """Load a fresh name, use it now and then, unload it; and try the bad adapters."""
        with httpx.Client(base_url=self.url, timeout=DEADLINE_S) as client:
            i = 0
            while time.monotonic() < self.end:
                i += 1
                name = f"churn-{i}"
                try:
                    self.churn_once(client, adapters, name, i, reference)
                except httpx.TransportError as error:
                    adapters.add("lost", f"{type(error).__name__}: {error}")

    def churn_once(self, client: httpx.Client, adapters: Tally, name: str, i: int, reference: str) -> None:
        response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "churn"})
        if response.status_code != 200:
            return adapters.add("load_failed", response.text)
        adapters.add("loaded")
        if i % 10 == 0:
            response = client.post("/v1/completions", json={"model": name, "prompt": PROMPTS[0],
                                                            "max_tokens": MAX_TOKENS, "temperature": 0,
                                                            "ignore_eos": True})
            ok = response.status_code == 200 and response.json()["choices"][0]["text"] == reference
            adapters.add("used" if ok else ("refused_cleanly" if response.status_code == 503 else "use_failed"),
                         response.text)
        response = client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        adapters.add("unloaded" if response.status_code == 200 else "unload_failed", response.text)
        if i % 5 == 0:
            path = self.bad_adapters[(i // 5) % len(self.bad_adapters)]
            response = client.post("/v1/load_lora_adapter", json={"lora_name": f"bad-{i}", "lora_path": path})
            adapters.add("bad_refused_4xx" if 400 <= response.status_code < 500 else "bad_not_refused",
                         f"{path}: {response.status_code} {response.text}")


def _json(body: dict | list | str) -> tuple[str, bytes, dict]:
    return "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"}


BAD_REQUESTS = [
    lambda rng, load: ("/v1/completions", b'{"model": "base", "prompt": ', {"content-type": "application/json"}),
    lambda rng, load: ("/v1/completions", b'{"model": "base", "prompt": "\xff\xfe"}', {}),
    lambda rng, load: ("/v1/chat/completions", bytes(rng.randrange(256) for _ in range(64)), {}),
    lambda rng, load: _json({"model": "base", "prompt": "x", "temperature": "hot"}),
    lambda rng, load: _json({"model": "base", "prompt": "x", "n": 1000}),
    lambda rng, load: _json({"model": "base", "prompt": "x", "max_tokens": 10**9}),
    lambda rng, load: _json({"model": "base", "prompt": list(range(1, 2000))}),
    lambda rng, load: _json({"model": "base", "prompt": [10**9, -1]}),
    lambda rng, load: _json({"model": "base", "prompt": "x", "stop": ["s"] * 1000}),
    lambda rng, load: _json({"model": "base", "prompt": "x" * (300 * 1024)}),  # past --max-body-size
    lambda rng, load: _json({"model": "no-such-adapter", "prompt": "x"}),
    lambda rng, load: _json({"model": "base", "prompt": "x", "tools": [{"type": "function"}]}),
    lambda rng, load: ("/v1/completions", b'{"model": "base", "prompt": "x", "top_p": NaN}', {}),
    lambda rng, load: ("/v1/completions", b"[" * 100_000, {}),
    lambda rng, load: ("/v1/load_lora_adapter", json.dumps({"lora_name": "x", "lora_path": "/etc"}).encode(), {}),
]


def references(url: str, models: list[str], churn_reference_model: str) -> dict:
    """The idle server's greedy answers, one request at a time."""
    answers = {}
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
        for model in models:
            for prompt in PROMPTS:
                body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
                response = client.post("/v1/completions", json=body)
                response.raise_for_status()
                answers[(model, prompt)] = response.json()["choices"][0]["text"]
        response = client.post("/v1/chat/completions", json={"model": "base", "messages": CHAT, "temperature": 0,
                                                              "max_tokens": MAX_TOKENS, "ignore_eos": True})
        response.raise_for_status()
        answers[("base", "chat")] = response.json()["choices"][0]["message"]["content"]
        client.post("/v1/load_lora_adapter", json={"lora_name": churn_reference_model, "lora_path": "churn"}) \
            .raise_for_status()
        body = {"model": churn_reference_model, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True}
        answers["churn"] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        client.post("/v1/unload_lora_adapter", json={"lora_name": churn_reference_model}).raise_for_status()
    return answers


# --- main ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    duration = args.seconds if args.seconds is not None else 60 * args.minutes
    work = Path(tempfile.mkdtemp(prefix="slora-soak-"))
    if args.tiny:
        model_path = str(tiny_model(work / "tiny-model"))
    else:
        model_path = args.model
    if model_path is None:
        from slora.models.loader import default_model_path, gguf_to_hf_folder

        config_folder = gguf_to_hf_folder(default_model_path())
    else:
        config_folder = Path(model_path)
    bad_adapters = write_adapters(work / "adapters", model_arch(config_folder))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(model_path, work / "adapters", port, work / "server.log")
    report = {"what": "scripts/soak.py", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "model": model_path or "SmolLM2-135M-Instruct (default)", "duration_s": duration,
              "client_threads": args.threads, "limits": LIMITS, "server_log": str(work / "server.log")}
    try:
        wait_healthy(process, url, timeout=600)
        models = ["base"] + [f"s{i:02d}" for i in range(NUM_ADAPTERS)]
        answers = references(url, models, "churn-reference")
        report["before"] = wait_idle(url, 60) | {"rss_mb": rss_mb(process.pid)}
        requests, adapters = Tally(), Tally()
        started = time.monotonic()
        load = Load(url, models, answers, started + duration, requests, bad_adapters)
        threads = [threading.Thread(target=load.client_thread, args=(seed,)) for seed in range(args.threads)]
        threads.append(threading.Thread(target=load.churn_thread, args=(adapters, answers["churn"])))
        memory: list[float] = []  # the server's RSS each minute: growth that levels off is the allocator warming up
        threads.append(threading.Thread(target=sample_memory, args=(process.pid, memory, started + duration)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=duration + 2 * DEADLINE_S)
        report["load_s"] = round(time.monotonic() - started, 1)
        report["threads_hung"] = sum(t.is_alive() for t in threads)
        report["after"] = wait_idle(url, 120) | {"rss_mb": rss_mb(process.pid)}
        report["rss_mb_each_minute"] = memory
        report["requests"] = summarize(requests)
        report["adapter_churn"] = dict(adapters.counts) | {"examples": adapters.examples}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            report["exit_code_after_sigterm"] = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            report["exit_code_after_sigterm"] = "killed: did not exit within 60 s of SIGTERM"
    report["ok"] = verdict(report)
    return report


def summarize(tally: Tally) -> dict:
    counts = dict(tally.counts)
    latencies = sorted(tally.latencies)
    pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None  # noqa: E731
    outcomes = {k: counts.get(k, 0) for k in ("served", "refused_cleanly", "bad_input_refused_4xx", "disconnected",
                                               "lost", "bad_input_5xx", "good_5xx", "mismatched")}
    return {"sent": sum(counts.values())} | outcomes | {"other": {k: v for k, v in counts.items() if k not in outcomes},
                                                        "served_latency_s": {"p50": pick(0.5), "p99": pick(0.99)},
                                                        "examples": tally.examples}


def verdict(report: dict) -> bool:
    requests, churn = report.get("requests"), report.get("adapter_churn", {})
    if not requests or report.get("threads_hung"):
        return False
    after = report["after"]
    clean = all(requests[k] == 0 for k in ("lost", "bad_input_5xx", "good_5xx", "mismatched")) and not requests["other"]
    churned = all(churn.get(k, 0) == 0 for k in ("lost", "load_failed", "unload_failed", "use_failed", "bad_not_refused"))
    idle = (after["running"], after["waiting"], after["kv_slots"]) == (0, 0, 0)
    same_adapters = after["registered_adapters"] == report["before"]["registered_adapters"]
    return clean and churned and idle and same_adapters and report["exit_code_after_sigterm"] in (0, -signal.SIGTERM)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=1.0)
    length.add_argument("--seconds", type=float, default=None)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--tiny", action="store_true", help="a tiny random Llama (fast; for tests)")
    model.add_argument("--model", default=None, help="a model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=4, help="client threads (plus one churning adapters)")
    args = parser.parse_args()
    report = run(args)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
