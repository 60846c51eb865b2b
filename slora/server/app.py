"""The OpenAI-compatible HTTP API: routes, admission, streaming, errors, run-time adapters.

`build_app(engine_or_config, options)` returns a FastAPI app whose lifespan starts the engine thread
(`AsyncEngine`). A request's way here: parse and validate the body (`protocol`), resolve `model` to
the base model or an adapter (404 otherwise), submit one engine request per prompt (tokenized,
checked against the limits, then admitted if the queue has room: all in the engine thread, so that
a bad request gets its 4xx even when the server is full and 503 + Retry-After means "valid, retry
later"), then either stream server-sent events or collect the whole answer. A client that goes away
aborts its requests at once.
Every error is an OpenAI error body; the pure-ASGI `_Guard` checks the API key, the body size (413
before parsing) and the per-key concurrency (429), and counts requests.

Limits (`ServerOptions`, each a `slora serve` flag) bound what one request may cost: prompt tokens,
prompt + max_tokens, n, body bytes, sequences queued, calls in flight per key. Adapters are checked
whole before they are served, at start-up (the server refuses to start, naming the file) and at
run time (4xx): folder (inside the root, a bounded number of regular files), config, header, and
every weight (NaN/Inf). See docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import itertools
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from slora.config import EngineConfig, LoRAConfig, ServerOptions
from slora.engine.engine import LLMEngine, RequestError, UnknownAdapterError
from slora.engine.sampling_params import SamplingParams
from slora.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, AdapterError
from slora.server.async_engine import AsyncEngine, ChoiceDelta, QueueFull, RequestStream, TokenLogprob, Update
from slora.server.metrics import ServerMetrics
from slora.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, LoadAdapterRequest,
                                   UnloadAdapterRequest, parse_body, request_schemas)

logger = logging.getLogger("slora.server")
VERSION = "0.1.0"
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter", "/health", "/version", "/metrics")
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
MAX_ADAPTER_ENTRIES = 64  # PEFT writes 2-3 files; a folder of thousands is refused before anything is read
MAX_ADAPTER_CONFIG_BYTES = 1 << 20
GREEDY_BELOW = 1e-5  # a smaller positive temperature is greedy (dividing by it overflows float32)
MIN_TOP_P = 1e-6  # a smaller top_p (0 in float32) means the same: only the most likely token
MAX_TEMPERATURE = 1e4
REPETITION_PENALTY_RANGE = (1e-4, 1e4)  # outside it the penalised logits overflow float32


def build_app(engine_or_config: LLMEngine | EngineConfig, options: ServerOptions | None = None) -> FastAPI:
    """The app; raises ValueError (AdapterError: file and problem) when a start-up adapter is bad."""
    options = options or ServerOptions()
    if isinstance(engine_or_config, LLMEngine):
        engine = engine_or_config
    else:
        check_startup_adapter_folders(engine_or_config.lora)
        engine = LLMEngine(engine_or_config)
    if options.check_adapter_weights:
        for name in engine.list_adapters():
            check_adapter_weights(engine, name)
    server = _Server(engine, options)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        server.engine.start()
        yield
        await server.engine.stop()

    app = FastAPI(title="slora", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _server_error)
    app.add_middleware(_Guard, server=server)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat_completions)
    app.get("/v1/models")(server.models)
    app.post("/v1/load_lora_adapter")(server.load_adapter)
    app.post("/v1/unload_lora_adapter")(server.unload_adapter)
    app.get("/health")(server.health)
    app.get("/version")(lambda: {"version": VERSION})
    app.get("/metrics")(lambda: Response(server.metrics.render(), media_type="text/plain; version=0.0.4"))
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the JSON body of each POST route (the handlers parse bodies themselves,
    so that every refusal is an OpenAI error): what schemathesis and clients generate requests from."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in request_schemas().items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
            schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": content}
        app.openapi_schema = schema
    return app.openapi_schema


# --- errors --------------------------------------------------------------------------------------
def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return _error_response(error)


async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    return _error_response(APIError(error.status_code, str(error.detail)))


async def _client_gone(_: Request, error: ClientDisconnect) -> Response:
    return Response(status_code=499)  # gone before its body arrived: nobody reads this


async def _server_error(_: Request, error: Exception) -> JSONResponse:
    logger.exception("request failed")
    return _error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error"))


class _Guard:
    """Pure ASGI middleware (streaming-safe): the API key on /v1/*, the body size (413: a declared
    Content-Length before reading, a chunked body as it arrives), generation calls in flight per key
    (429), and requests counted by status."""

    def __init__(self, app, server: "_Server"):
        self.app = app
        self.server = server
        key = server.options.api_key
        self.key = key.encode() if key else None
        self.max_body = server.options.max_body_size
        self.in_flight: dict[bytes, int] = {}  # generation calls per key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.server.metrics.http_requests.labels(route, str(message["status"])).inc()
            await send(message)

        refusal = self._refusal(scope, path)
        if refusal is not None:
            return await _error_response(refusal)(scope, receive, counting_send)
        receive = self._bounded(receive)
        if self.key is None or path not in GENERATION_ROUTES:
            return await self.app(scope, receive, counting_send)
        self.in_flight[self.key] = self.in_flight.get(self.key, 0) + 1
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.in_flight[self.key] -= 1

    def _refusal(self, scope, path: str) -> APIError | None:
        if self.key is not None and path.startswith("/v1/") and not self._authorized(scope):
            return APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key")
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return self._too_large()
        limit = self.server.options.max_concurrency_per_key
        if self.key is not None and path in GENERATION_ROUTES and limit is not None \
                and self.in_flight.get(self.key, 0) >= limit:
            return APIError(429, f"this API key has {limit} requests in flight, the most allowed "
                            "(--max-concurrency-per-key); retry later", None, "too_many_requests",
                            {"Retry-After": str(self.server.options.retry_after_s)})
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_body} bytes (--max-body-size)", None,
                        "body_too_large")

    def _bounded(self, receive):
        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # raised into the handler that reads the body
                    raise self._too_large()
            return message

        return bounded_receive

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"


# --- the server ----------------------------------------------------------------------------------
class _Server:
    def __init__(self, engine: LLMEngine, options: ServerOptions):
        self.engine = AsyncEngine(engine)
        self.options = options
        self.model_name = options.served_model_name or engine.loaded.name
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.capacity = None if options.max_queue is None else engine.config.scheduler.max_num_seqs + options.max_queue
        self.engine.capacity = self.capacity
        self.max_total_tokens = min(options.max_total_tokens or self.max_model_len, self.max_model_len)
        self.max_prompt_tokens = min(options.max_prompt_tokens or self.max_total_tokens, self.max_total_tokens - 1)
        for name in ("max_n", "max_body_size", "max_queue", "max_concurrency_per_key"):
            value = getattr(options, name)
            if value is not None and value < (0 if name == "max_queue" else 1):
                raise ValueError(f"{name} must be at least {0 if name == 'max_queue' else 1}, got {value}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_total_tokens must be at least 2, got {self.max_total_tokens}")
        self.in_flight = 0  # sequences admitted and not yet finished
        self.created = int(time.time())
        self.metrics = ServerMetrics(lambda: self.engine.snapshot)
        self.adapter_root = Path(options.adapter_root).expanduser().resolve() if options.adapter_root else None
        if self.adapter_root is not None and not self.adapter_root.is_dir():
            raise ValueError(f"adapter root {options.adapter_root!r} is not a directory")

    # --- endpoints ---------------------------------------------------------------------------------
    async def health(self) -> Response:
        return Response(status_code=200 if self.engine.alive else 503)

    async def models(self) -> dict[str, Any]:
        base = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "slora",
                "root": self.engine.engine.loaded.name, "parent": None, "max_model_len": self.max_model_len}
        adapters = [{"id": name, "object": "model", "created": self.created, "owned_by": "slora", "root": path,
                     "parent": self.model_name, "max_model_len": self.max_model_len}
                    for name, path in self.engine.snapshot.adapters.items()]
        return {"object": "list", "data": [base, *adapters]}

    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        body = parse_body(await request.body(), CompletionRequest)
        params = self._checked(body.sampling_params())
        encodes = [_encode_text(p) if isinstance(p, str) else _encode_ids(p) for p in body.prompts()]
        limit = self._limit("prompt", "max_tokens")
        generation = await self._start(body.model, encodes, params, "cmpl", "prompt", arrival, limit)
        fmt = _CompletionFormat(generation.id, body.model, self.created, params.logprobs)
        return await self._respond(request, generation, fmt, body.stream, body.include_usage)

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        body = parse_body(await request.body(), ChatCompletionRequest)
        params = self._checked(body.sampling_params())
        messages = [m.for_template() for m in body.messages]
        limit = self._limit("messages", "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
        generation = await self._start(body.model, [_encode_chat(messages)], params, "chatcmpl", "messages", arrival,
                                       limit)
        fmt = _ChatFormat(generation.id, body.model, self.created, params.logprobs)
        return await self._respond(request, generation, fmt, body.stream, body.include_usage)

    async def load_adapter(self, request: Request) -> dict[str, Any]:
        body = parse_body(await request.body(), LoadAdapterRequest)
        root = self._require_adapter_root()
        name = body.lora_name
        if name == self.model_name:
            raise APIError(400, f"lora_name {name!r} is the base model's name", "lora_name")
        path = _confine(root, body.lora_path)

        def add(engine: LLMEngine) -> None:  # checked whole, weights included, before anyone can use it
            engine.add_adapter(name, str(path))
            try:
                check_adapter_weights(engine, name)
            except BaseException:
                engine.remove_adapter(name)
                raise

        try:
            await self.engine.call(add)
        except ValueError as error:  # AdapterError: names the file and the problem
            raise APIError(400, str(error), "lora_path", "invalid_adapter") from None
        return {"id": name, "object": "model", "parent": self.model_name, "root": str(path)}

    async def unload_adapter(self, request: Request) -> dict[str, Any]:
        body = parse_body(await request.body(), UnloadAdapterRequest)
        self._require_adapter_root()
        try:
            await self.engine.call(lambda engine: engine.remove_adapter(body.lora_name))
        except KeyError as error:
            raise APIError(404, str(error), "lora_name", "model_not_found") from None
        except ValueError as error:  # still in use
            raise APIError(409, str(error), "lora_name", "adapter_in_use") from None
        return {"id": body.lora_name, "object": "model", "deleted": True}

    # --- limits ------------------------------------------------------------------------------------
    def _checked(self, params: SamplingParams) -> SamplingParams:
        """The server's limits on sampling parameters (beyond SamplingParams' own ranges): what one
        request may cost, and values whose arithmetic would overflow float32 in the sampler."""
        if params.n > self.options.max_n:
            raise APIError(400, f"n is {params.n}; at most {self.options.max_n} (--max-n)", "n", "invalid_value")
        bad = [t for t in params.stop_token_ids or () if t >= self.vocab_size]
        if bad:
            raise APIError(400, f"stop_token_ids has ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}",
                           "stop_token_ids", "invalid_value")
        if params.temperature > MAX_TEMPERATURE:
            raise APIError(400, f"temperature must be <= {MAX_TEMPERATURE:g}, got {params.temperature}",
                           "temperature", "invalid_value")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= params.repetition_penalty <= high:
            raise APIError(400, f"repetition_penalty must be in [{low:g}, {high:g}], got {params.repetition_penalty}",
                           "repetition_penalty", "invalid_value")
        if 0 < params.temperature < GREEDY_BELOW:
            params = dataclasses.replace(params, temperature=0.0)
        if params.top_p < MIN_TOP_P:
            params = dataclasses.replace(params, top_p=MIN_TOP_P)
        return params

    def _limit(self, prompt_param: str, max_tokens_param: str) -> Callable[[list[int], SamplingParams], SamplingParams]:
        """Per prompt, once tokenized (in the engine thread): --max-prompt-tokens, and prompt + max_tokens
        within --max-total-tokens (an unset max_tokens becomes what is left)."""

        def limit(prompt: list[int], params: SamplingParams) -> SamplingParams:
            size, total = len(prompt), self.max_total_tokens
            if size > self.max_prompt_tokens:
                raise APIError(400, f"the prompt has {size} tokens; at most {self.max_prompt_tokens} are allowed "
                               "(--max-prompt-tokens, within the context)", prompt_param, "prompt_too_long")
            room = total - size
            if params.max_tokens is not None and params.max_tokens > room:
                raise APIError(400, f"{max_tokens_param} is {params.max_tokens}, but the prompt has {size} tokens and a "
                               f"request may hold {total} (--max-total-tokens); ask for at most {room}",
                               max_tokens_param, "too_many_tokens")
            if params.min_tokens > room:
                raise APIError(400, f"min_tokens is {params.min_tokens}, but only {room} tokens fit after the prompt",
                               "min_tokens", "too_many_tokens")
            return params if params.max_tokens is not None else dataclasses.replace(params, max_tokens=room)

        return limit

    # --- admission ---------------------------------------------------------------------------------
    async def _start(self, model: str, encodes: list[Callable[[LLMEngine], list[int]]], params: SamplingParams,
                     prefix: str, prompt_param: str, arrival: float,
                     limit: Callable[[list[int], SamplingParams], SamplingParams]) -> "_Generation":
        adapter = self._adapter_for(model)
        count = params.n * len(encodes)
        if self.capacity is not None and count > self.capacity:
            raise APIError(400, f"the request asks for {count} sequences (n x prompts); the server holds at most "
                           f"{self.capacity}", "n", "invalid_value")
        generation = _Generation(self, f"{prefix}-{uuid.uuid4().hex}", params.n, count, arrival)
        try:
            for i, encode in enumerate(encodes):
                stream = await self.engine.submit(encode, params, adapter, f"{generation.id}-{i}", limit)
                generation.streams.append(stream)
        except BaseException as error:
            generation.close()
            if isinstance(error, UnknownAdapterError):
                raise _unknown_model(model) from None
            if isinstance(error, QueueFull):  # only once the request was found valid: a retry can succeed
                raise APIError(503, f"{error}; retry later", None, "queue_full",
                               {"Retry-After": str(self.options.retry_after_s)}) from None
            if isinstance(error, ValueError):  # RequestError: the prompt, as the message says
                raise APIError(400, str(error), prompt_param) from None
            raise
        generation.admitted()
        return generation

    def _adapter_for(self, model: str) -> str | None:
        if model == self.model_name:
            return None
        if model in self.engine.snapshot.adapters:
            return model
        raise _unknown_model(model)

    def _require_adapter_root(self) -> Path:
        if self.adapter_root is None:
            raise APIError(403, "run-time adapter loading is off; start the server with --adapter-root DIR",
                           None, "adapter_loading_disabled")
        return self.adapter_root

    # --- answering ---------------------------------------------------------------------------------
    async def _respond(self, request: Request, generation: "_Generation", fmt: "_Format", stream: bool,
                       include_usage: bool) -> Response:
        if stream:
            return _EventStream(_sse(generation, fmt, include_usage), on_close=generation.close)
        choices = [_Choice() for _ in range(generation.num_choices)]

        async def collect() -> None:
            async for delta in generation.deltas():
                choices[delta.index].add(delta)

        collecting = asyncio.create_task(collect())
        disconnect = asyncio.create_task(_wait_for_disconnect(request))
        try:
            await asyncio.wait({collecting, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            if not collecting.done():
                collecting.cancel()
            generation.close()
        if not collecting.done() or collecting.cancelled():
            return Response(status_code=499)  # the client went away; nobody reads this
        collecting.result()  # raises an engine error as an APIError
        return JSONResponse(fmt.response(choices, generation.usage()))


def _unknown_model(model: str) -> APIError:
    return APIError(404, f"the model {model!r} does not exist", "model", "model_not_found")


# --- adapters: checked whole before they are served -----------------------------------------------
class _OutsideRoot(AdapterError):
    """An adapter path that leads outside the folder it must stay in."""


def check_adapter_folder(folder: Path, root: Path | None = None) -> Path:
    """The resolved adapter folder, if it is inside `root` (itself and every entry, after `..` and
    links) when a root is given, holds at most MAX_ADAPTER_ENTRIES entries (counted without reading
    more), and its config and weights, where present, are regular files of sane size (a FIFO would
    block the reader). Raises AdapterError naming the path; the config and weights are checked after."""
    resolved = folder.expanduser().resolve()
    if root is not None and not resolved.is_relative_to(root):
        raise _OutsideRoot(folder, f"leads outside {root}")
    if not resolved.is_dir():
        raise AdapterError(folder, "not an adapter folder")
    with os.scandir(resolved) as entries:
        listed = list(itertools.islice(entries, MAX_ADAPTER_ENTRIES + 1))
    if len(listed) > MAX_ADAPTER_ENTRIES:
        raise AdapterError(folder, f"holds more than {MAX_ADAPTER_ENTRIES} entries; an adapter folder holds "
                           f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    for entry in listed:
        target = Path(entry.path).resolve()
        if root is not None and not target.is_relative_to(root):
            raise _OutsideRoot(folder, f"{entry.name} links outside {root}")
        if entry.name in (CONFIG_FILE, WEIGHTS_FILE) and target.exists() and not stat.S_ISREG(target.stat().st_mode):
            raise AdapterError(target, "not a regular file")
    config = resolved / CONFIG_FILE
    if config.is_file() and config.stat().st_size > MAX_ADAPTER_CONFIG_BYTES:
        raise AdapterError(config, f"{config.stat().st_size} bytes; an adapter config is at most "
                           f"{MAX_ADAPTER_CONFIG_BYTES}")
    return resolved


def check_startup_adapter_folders(lora: LoRAConfig) -> None:
    """Folder checks of the adapters named at start-up: `--lora` paths (the operator's choice, not
    confined) and the sub-folders of `--lora-dir`, which must stay inside it."""
    for path in lora.adapters.values():
        check_adapter_folder(Path(path))
    if lora.lora_dir and Path(lora.lora_dir).expanduser().is_dir():
        root = Path(lora.lora_dir).expanduser().resolve()
        for sub in sorted(root.iterdir()):
            if (sub / CONFIG_FILE).is_file():
                check_adapter_folder(sub, root)


def check_adapter_weights(engine: LLMEngine, name: str) -> None:
    """Read every tensor of a registered adapter once (into the host store, where its first request
    finds it): unreadable tensors and NaN/Inf raise AdapterError naming the file."""
    spec = engine.registry.get(name)
    try:
        engine.residency.store.get(spec)
    except AdapterError:
        raise
    except Exception as error:  # noqa: BLE001 - packing failed for a reason the checks above missed
        raise AdapterError(spec.weights_file, f"cannot load the weights: {type(error).__name__}: {error}") from error


def _confine(root: Path, lora_path: str) -> Path:
    """The adapter folder `lora_path` (relative paths are relative to the root) after
    `check_adapter_folder` against the root: 403 when it leaves the root, 400 otherwise."""
    try:
        candidate = Path(lora_path).expanduser()
        return check_adapter_folder(candidate if candidate.is_absolute() else root / candidate, root)
    except _OutsideRoot as error:
        raise APIError(403, f"lora_path {lora_path!r} {error.problem}", "lora_path", "path_not_allowed") from None
    except AdapterError as error:
        raise APIError(400, f"lora_path {lora_path!r}: {error}", "lora_path", "invalid_adapter") from None
    except (OSError, ValueError, RuntimeError) as error:  # unreadable, NUL bytes, link loops
        raise APIError(400, f"lora_path {lora_path!r}: {error}", "lora_path", "invalid_adapter") from None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- prompts (run in the engine thread, which owns the tokenizer) --------------------------------
def _encode_ids(ids: list[int]) -> Callable[[LLMEngine], list[int]]:
    return lambda engine: list(ids)


def _encode_text(text: str) -> Callable[[LLMEngine], list[int]]:
    def encode(engine: LLMEngine) -> list[int]:
        if engine.tokenizer is None:
            raise RequestError(f"model {engine.loaded.name} has no tokenizer; send the prompt as token ids")
        try:
            return engine.tokenizer.encode(text, add_special_tokens=True)
        except Exception as error:  # e.g. lone surrogates, which the Rust tokenizer cannot take
            raise RequestError(f"the prompt cannot be tokenized: {type(error).__name__}: {error}") from None

    return encode


def _encode_chat(messages: list[dict[str, str]]) -> Callable[[LLMEngine], list[int]]:
    def encode(engine: LLMEngine) -> list[int]:
        tokenizer = engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise RequestError(f"model {engine.loaded.name} has no chat template; use /v1/completions")
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as error:  # jinja raises its own types for templates that refuse a conversation
            raise RequestError(f"the chat template refused these messages: {error}") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    return encode


# --- one HTTP call's generation ------------------------------------------------------------------
class _Generation:
    """The engine requests of one HTTP call (one per prompt), merged into one stream of choice deltas.

    Holds the call's reservation of queue room until `close()`, which also aborts what is unfinished.
    """

    def __init__(self, server: _Server, generation_id: str, n: int, num_choices: int, arrival: float):
        self.server = server
        self.id = generation_id
        self.n = n
        self.num_choices = num_choices
        self.arrival = arrival
        self.streams: list[RequestStream] = []
        self.completion_tokens = 0
        self.finished_choices = 0
        self.closed = False
        self._last_token_time: dict[int, float] = {}
        server.in_flight += num_choices

    @property
    def prompt_tokens(self) -> int:
        return sum(len(s.prompt_token_ids) for s in self.streams)

    def admitted(self) -> None:
        self.server.metrics.prompt_tokens.inc(self.prompt_tokens)

    def usage(self) -> dict[str, int]:
        prompt = self.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Choice deltas of every prompt as they come, with indices `prompt * n + i`."""
        merged: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            async for update in stream.updates():
                merged.put_nowait((i, update))

        pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(self.streams)
            while remaining:
                i, update = await merged.get()
                if update.error:
                    raise APIError(500, update.error, None, "engine_error")
                self._observe(i, update)
                remaining -= update.finished
                for delta in update.choices:
                    yield dataclasses.replace(delta, index=i * self.n + delta.index)
        finally:
            for task in pumps:
                task.cancel()
            self.close()

    def _observe(self, i: int, update: Update) -> None:
        metrics, now = self.server.metrics, time.monotonic()
        tokens = sum(len(d.token_ids) for d in update.choices)
        if tokens:
            self.completion_tokens += tokens
            metrics.generation_tokens.inc(tokens)
            last = self._last_token_time.get(i)
            (metrics.ttft.observe(now - self.arrival) if last is None else metrics.itl.observe(now - last))
            self._last_token_time[i] = now
        for delta in update.choices:
            if delta.finish_reason is not None:
                metrics.finished.labels(delta.finish_reason).inc()
                self.finished_choices += 1
        if update.finished:
            metrics.e2e.observe(now - self.arrival)

    def close(self) -> None:
        """Abort what is unfinished and give back the queue room; safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        for stream in self.streams:
            stream.abort()
        unfinished = self.num_choices - self.finished_choices
        if unfinished and self.streams:
            self.server.metrics.finished.labels("abort").inc(unfinished)
        self.server.in_flight -= self.num_choices


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason


class _EventStream(StreamingResponse):
    """Server-sent events that run `on_close` however the stream ends (done, error or disconnect)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _sse(generation: _Generation, fmt: "_Format", include_usage: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}
    try:
        for chunk in fmt.first_chunks(generation.num_choices):
            yield _event(chunk | extra)
        async for delta in generation.deltas():
            chunk = fmt.chunk(delta)
            if chunk is not None:
                yield _event(chunk | extra)
        if include_usage:
            yield _event(fmt.chunk_base() | {"choices": [], "usage": generation.usage()})
    except APIError as error:
        yield _event(error.body())
    yield "data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


# --- response formats ----------------------------------------------------------------------------
class _Format:
    object_name = ""
    chunk_name = ""

    def __init__(self, response_id: str, model: str, created: int, logprobs: int | None):
        self.id, self.model, self.created, self.num_logprobs = response_id, model, created, logprobs

    def chunk_base(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_name, "created": self.created, "model": self.model}

    def first_chunks(self, num_choices: int) -> list[dict[str, Any]]:
        return []


class _CompletionFormat(_Format):
    object_name, chunk_name = "text_completion", "text_completion"

    def response(self, choices: list[_Choice], usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": [{"index": i, "text": c.text, "logprobs": self._logprobs(c.logprobs),
                             "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                "usage": usage}

    def chunk(self, delta: ChoiceDelta) -> dict[str, Any] | None:
        if not delta.text and delta.finish_reason is None and not (delta.logprobs and delta.token_ids):
            return None
        choice = {"index": delta.index, "text": delta.text, "logprobs": self._logprobs(delta.logprobs),
                  "finish_reason": delta.finish_reason}
        return self.chunk_base() | {"choices": [choice]}

    def _logprobs(self, items: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if items is None:
            return None
        offsets, offset = [], 0
        for item in items:
            offsets.append(offset)
            offset += len(item.token)
        return {"tokens": [t.token for t in items], "token_logprobs": [t.logprob for t in items],
                "top_logprobs": [self._top(t) for t in items], "text_offset": offsets}

    def _top(self, item: TokenLogprob) -> dict[str, float]:
        top = {token: lp for token, _, lp in item.top[: self.num_logprobs]}
        top.setdefault(item.token, item.logprob)  # OpenAI: the sampled token is always there
        return top


class _ChatFormat(_Format):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def response(self, choices: list[_Choice], usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish_reason}
                            for i, c in enumerate(choices)],
                "usage": usage}

    def first_chunks(self, num_choices: int) -> list[dict[str, Any]]:
        return [self.chunk_base() | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
                for i in range(num_choices)]

    def chunk(self, delta: ChoiceDelta) -> dict[str, Any] | None:
        if not delta.text and delta.finish_reason is None and not (delta.logprobs and delta.token_ids):
            return None
        choice = {"index": delta.index, "delta": {"content": delta.text} if delta.text else {},
                  "logprobs": self._logprobs(delta.logprobs), "finish_reason": delta.finish_reason}
        return self.chunk_base() | {"choices": [choice]}

    def _logprobs(self, items: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if items is None:
            return None
        return {"content": [
            {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
             "top_logprobs": [{"token": tok, "logprob": lp, "bytes": list(tok.encode())}
                              for tok, _, lp in t.top[: self.num_logprobs]]}
            for t in items]}
