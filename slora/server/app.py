"""The OpenAI-compatible HTTP API: routes, admission, streaming, errors, run-time adapters.

`build_app(engine_or_config, options)` returns a FastAPI app whose lifespan starts the engine thread
(`AsyncEngine`). A request's way here: parse and validate the body (`protocol`), resolve `model` to
the base model or an adapter (404 otherwise), reserve room in the queue (503 + Retry-After when it
is full), submit one engine request per prompt (tokenized in the engine thread), then either stream
server-sent events or collect the whole answer. A client that goes away aborts its requests at once.
Every error is an OpenAI error body; the pure-ASGI `_Guard` checks the API key and counts requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slora.config import EngineConfig
from slora.engine.engine import LLMEngine, RequestError, UnknownAdapterError
from slora.engine.sampling_params import SamplingParams
from slora.server.async_engine import AsyncEngine, ChoiceDelta, RequestStream, TokenLogprob, Update
from slora.server.metrics import ServerMetrics
from slora.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, LoadAdapterRequest,
                                   UnloadAdapterRequest, parse_body)

logger = logging.getLogger("slora.server")
VERSION = "0.1.0"
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter", "/health", "/version", "/metrics")


@dataclass
class ServerOptions:
    served_model_name: str | None = None  # default: the model's folder name
    api_key: str | None = None  # required as `Authorization: Bearer KEY` on /v1/* when set
    adapter_root: str | None = None  # run-time adapter loading only from inside it; off when None
    max_queue: int | None = None  # sequences that may wait beyond max_num_seqs; None = no limit
    retry_after_s: int = 1


def build_app(engine_or_config: LLMEngine | EngineConfig, options: ServerOptions | None = None) -> FastAPI:
    engine = engine_or_config if isinstance(engine_or_config, LLMEngine) else LLMEngine(engine_or_config)
    server = _Server(engine, options or ServerOptions())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        server.engine.start()
        yield
        await server.engine.stop()

    app = FastAPI(title="slora", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
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
    return app


# --- errors --------------------------------------------------------------------------------------
def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return _error_response(error)


async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    return _error_response(APIError(error.status_code, str(error.detail)))


async def _server_error(_: Request, error: Exception) -> JSONResponse:
    logger.exception("request failed")
    return _error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error"))


class _Guard:
    """Pure ASGI middleware (streaming-safe): API key on /v1/*, and requests counted by status."""

    def __init__(self, app, server: "_Server"):
        self.app = app
        self.server = server
        key = server.options.api_key
        self.key = key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.server.metrics.http_requests.labels(route, str(message["status"])).inc()
            await send(message)

        if self.key is not None and path.startswith("/v1/") and not self._authorized(scope):
            error = APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'", None,
                             "invalid_api_key")
            return await _error_response(error)(scope, receive, counting_send)
        await self.app(scope, receive, counting_send)

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
        self.capacity = None if options.max_queue is None else engine.config.scheduler.max_num_seqs + options.max_queue
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
        params = body.sampling_params()
        encodes = [_encode_text(p) if isinstance(p, str) else _encode_ids(p) for p in body.prompts()]
        generation = await self._start(body.model, encodes, params, "cmpl", "prompt", arrival)
        fmt = _CompletionFormat(generation.id, body.model, self.created, params.logprobs)
        return await self._respond(request, generation, fmt, body.stream, body.include_usage)

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        body = parse_body(await request.body(), ChatCompletionRequest)
        params = body.sampling_params()
        messages = [m.for_template() for m in body.messages]
        generation = await self._start(body.model, [_encode_chat(messages)], params, "chatcmpl", "messages", arrival)
        fmt = _ChatFormat(generation.id, body.model, self.created, params.logprobs)
        return await self._respond(request, generation, fmt, body.stream, body.include_usage)

    async def load_adapter(self, request: Request) -> dict[str, Any]:
        body = parse_body(await request.body(), LoadAdapterRequest)
        root = self._require_adapter_root()
        name = body.lora_name
        if name == self.model_name:
            raise APIError(400, f"lora_name {name!r} is the base model's name", "lora_name")
        path = _confine(root, body.lora_path)
        try:
            await self.engine.call(lambda engine: engine.add_adapter(name, str(path)))
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

    # --- admission ---------------------------------------------------------------------------------
    async def _start(self, model: str, encodes: list[Callable[[LLMEngine], list[int]]], params: SamplingParams,
                     prefix: str, prompt_param: str, arrival: float) -> "_Generation":
        adapter = self._adapter_for(model)
        count = params.n * len(encodes)
        if self.capacity is not None and self.in_flight + count > self.capacity:
            raise APIError(503, f"the server is at capacity ({self.in_flight} sequences in flight); retry later",
                           None, "queue_full", {"Retry-After": str(self.options.retry_after_s)})
        generation = _Generation(self, f"{prefix}-{uuid.uuid4().hex}", params.n, count, arrival)
        try:
            for i, encode in enumerate(encodes):
                stream = await self.engine.submit(encode, params, adapter, f"{generation.id}-{i}")
                generation.streams.append(stream)
        except BaseException as error:
            generation.close()
            if isinstance(error, UnknownAdapterError):
                raise _unknown_model(model) from None
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


def _confine(root: Path, lora_path: str) -> Path:
    """The adapter folder `lora_path` (relative paths are relative to the root) if it stays inside the
    root after resolving `..` and links, itself and every file in it; else 403."""
    try:
        candidate = Path(lora_path).expanduser()
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not resolved.is_relative_to(root):
            raise APIError(403, f"lora_path {lora_path!r} is outside the adapter root", "lora_path", "path_not_allowed")
        if not resolved.is_dir():
            raise APIError(400, f"lora_path {lora_path!r} is not an adapter folder", "lora_path", "invalid_adapter")
        for entry in resolved.iterdir():
            if not entry.resolve().is_relative_to(root):
                raise APIError(403, f"lora_path {lora_path!r}: {entry.name} links outside the adapter root",
                               "lora_path", "path_not_allowed")
    except (OSError, ValueError, RuntimeError) as error:  # unreadable, NUL bytes, link loops
        raise APIError(400, f"lora_path {lora_path!r}: {error}", "lora_path", "invalid_adapter") from None
    return resolved


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
        return engine.tokenizer.encode(text, add_special_tokens=True)

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
