"""The engine's own thread, and the bridge between it and the asyncio event loop.

`LLMEngine` is not thread-safe and one step blocks for a whole forward pass, so one thread owns the
engine and its tokenizer: it drains a queue of commands (add, abort, call, stop), steps while any
request is unfinished, and otherwise blocks on the queue. What a step produced goes back to the
event loop with one `call_soon_threadsafe` per step, into one asyncio queue per request, already cut
into deltas (new text, new token ids, their logprobs with token strings). HTTP handlers therefore
never touch the engine and never wait for a step; they await their request's queue.

After every round the thread publishes an `EngineSnapshot` (running/waiting requests, pool slots,
adapter counters) that `/metrics` and `/v1/models` read without asking the thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from slora.engine.engine import LLMEngine
from slora.engine.request import RequestOutput
from slora.engine.sampling_params import SamplingParams

logger = logging.getLogger("slora.server")
T = TypeVar("T")


class QueueFull(Exception):
    """The engine holds all the sequences it may (running + queued); the caller answers 503."""


@dataclass
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, int, float]]  # (token, id, logprob), most likely first


@dataclass
class ChoiceDelta:
    """What one of a request's n sequences gained in one step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None


@dataclass
class Update:
    choices: list[ChoiceDelta]
    finished: bool
    error: str | None = None


@dataclass(frozen=True)
class EngineSnapshot:
    running: int = 0
    waiting: int = 0
    num_slots: int = 0
    free_slots: int = 0
    kv_slots: int = 0
    adapter_slots: int = 0
    adapters: dict[str, str] = field(default_factory=dict)  # name -> folder
    lora: dict[str, int] = field(default_factory=dict)  # engine.lora_stats()
    steps: dict[str, int] = field(default_factory=dict)  # engine.step_stats()


class RequestStream:
    """One admitted request as the event loop sees it: its prompt and an async iterator of updates."""

    def __init__(self, engine: "AsyncEngine", request_id: str, n: int):
        self.engine = engine
        self.request_id = request_id
        self.n = n
        self.prompt_token_ids: list[int] = []
        self.finished = False
        self.queue: asyncio.Queue[Update] = asyncio.Queue()

    async def updates(self) -> AsyncIterator[Update]:
        """Yield updates until the request finishes; leaving early (disconnect) aborts it."""
        try:
            while not self.finished:
                update = await self.queue.get()
                self.finished = update.finished
                yield update
        finally:
            if not self.finished:
                self.abort()

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class _Tracker:
    """Engine-thread side of one request: how much of each sequence was already sent."""

    def __init__(self, stream: RequestStream):
        self.stream = stream
        self.text_sent = [0] * stream.n
        self.tokens_sent = [0] * stream.n
        self.finish_sent = [False] * stream.n

    def delta(self, output: RequestOutput, token_text: Callable[[int], str]) -> Update:
        choices = []
        for out in output.outputs:
            i = out.index
            text = out.text[self.text_sent[i]:]
            new_ids = out.token_ids[self.tokens_sent[i]:]
            finish = out.finish_reason if not self.finish_sent[i] else None
            if not text and not new_ids and finish is None:
                continue
            logprobs = None
            if out.logprobs is not None:
                entries = out.logprobs[self.tokens_sent[i]:self.tokens_sent[i] + len(new_ids)]
                logprobs = [_token_logprob(t, e, token_text) for t, e in zip(new_ids, entries)]
            self.text_sent[i] += len(text)
            self.tokens_sent[i] += len(new_ids)
            self.finish_sent[i] = self.finish_sent[i] or finish is not None
            choices.append(ChoiceDelta(i, text, new_ids, logprobs, finish))
        errors = [o.error for o in output.outputs if o.error]
        return Update(choices, output.finished, errors[0] if errors else None)


def _token_logprob(token_id: int, entry: dict[int, float], token_text: Callable[[int], str]) -> TokenLogprob:
    top = sorted(((t, lp) for t, lp in entry.items()), key=lambda x: -x[1])
    return TokenLogprob(token_text(token_id), token_id, entry[token_id], [(token_text(t), t, lp) for t, lp in top])


class AsyncEngine:
    """Runs an LLMEngine in a dedicated thread; every method here is called from the event loop."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.snapshot = EngineSnapshot()
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._trackers: dict[str, _Tracker] = {}
        self._adapters: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.capacity: int | None = None  # unfinished sequences the engine may hold; None = no limit
        self._thread: threading.Thread | None = None
        self._refresh_adapters()
        self._publish()

    # --- event-loop side --------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="slora-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _check_alive(self) -> None:
        if not self.alive:
            raise RuntimeError("the engine thread is not running")

    async def stop(self) -> None:
        """Abort whatever is left (nobody is listening any more) and end the thread."""
        if self._thread is not None:
            self._commands.put(("stop",))
            await asyncio.to_thread(self._thread.join)

    async def submit(self, encode: Callable[[LLMEngine], list[int]], params: SamplingParams,
                     adapter: str | None, request_id: str | None = None,
                     limit: Callable[[list[int], SamplingParams], SamplingParams] | None = None) -> RequestStream:
        """Admit one prompt; `encode` runs in the engine thread (which owns the tokenizer), then
        `limit(prompt, params)`, which may refuse the prompt or bound the parameters.

        Raises what `encode`, `limit` or `add_request` raised (RequestError, UnknownAdapterError, ...).
        """
        self._check_alive()
        stream = RequestStream(self, request_id or f"req-{uuid.uuid4().hex}", params.n)
        admitted = self._loop.create_future()
        self._commands.put(("add", encode, params, adapter, stream, admitted, limit))
        try:
            stream.prompt_token_ids = await admitted
        except asyncio.CancelledError:
            stream.abort()
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` in the engine thread between steps (adapter loading, listing)."""
        self._check_alive()
        done = self._loop.create_future()
        self._commands.put(("call", fn, done))
        return await done

    # --- engine-thread side -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop_until_stopped()
        except Exception as error:  # a bug: fail every request rather than leave clients hanging
            logger.exception("the engine thread stopped")
            self._fail_all(f"the engine stopped: {error}")
            raise

    def _loop_until_stopped(self) -> None:
        while True:
            for command in self._drain(block=not self.engine.has_unfinished()):
                if command[0] == "stop":
                    for request_id in list(self._trackers):
                        self.engine.abort(request_id)
                    self._trackers.clear()
                    return
                self._execute(command)
            if self.engine.has_unfinished():
                self._step()
            self._publish()

    def _drain(self, block: bool) -> list[tuple]:
        commands = [self._commands.get()] if block else []
        try:
            while True:
                commands.append(self._commands.get_nowait())
        except queue.Empty:
            return commands

    def _execute(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, encode, params, adapter, stream, admitted, limit = command
            try:
                prompt = encode(self.engine)
                if limit is not None:
                    params = limit(prompt, params)
                self.engine.add_request(prompt, params, adapter, stream.request_id)  # validates the prompt
                self._check_capacity(stream.request_id)
            except Exception as error:  # reported to the HTTP handler, which maps it to a status
                self._resolve(admitted, error=error)
                return
            self._trackers[stream.request_id] = _Tracker(stream)
            self._resolve(admitted, result=prompt)
        elif kind == "abort":
            if self._trackers.pop(command[1], None) is not None:
                self.engine.abort(command[1])
        elif kind == "call":
            _, fn, done = command
            try:
                result = fn(self.engine)
            except Exception as error:
                self._resolve(done, error=error)
                return
            self._refresh_adapters()
            self._publish()
            self._resolve(done, result=result)

    def _check_capacity(self, request_id: str) -> None:
        """Checked after the request was validated and added (this thread alone adds, so it is exact)."""
        held = len(self.engine.scheduler.waiting) + len(self.engine.scheduler.running)
        if self.capacity is not None and held > self.capacity:
            self.engine.abort(request_id)
            raise QueueFull(f"the server is at capacity ({self.capacity} sequences running or queued)")

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # a failed step fails the requests in it, not the server
            logger.exception("engine step failed")
            self._fail_all(f"engine step failed: {error}")
            return
        deliveries = []
        for output in outputs:
            tracker = self._trackers.get(output.request_id)
            if tracker is None:
                continue
            try:
                update = tracker.delta(output, self._token_text)
            except Exception as error:  # this request's update cannot be built: it fails alone
                logger.exception("request %s failed while streaming", output.request_id)
                self.engine.abort(output.request_id)
                update = Update([], True, f"request failed while streaming: {type(error).__name__}: {error}")
            if update.choices or update.finished:
                deliveries.append((tracker.stream.queue, update))
            if update.finished:
                del self._trackers[output.request_id]
        if deliveries:
            self._loop.call_soon_threadsafe(_deliver, deliveries)

    def _fail_all(self, message: str) -> None:
        failed = [(t.stream.queue, Update([], True, message)) for t in self._trackers.values()]
        for request_id in list(self._trackers):
            self.engine.abort(request_id)
        self._trackers.clear()
        self._loop.call_soon_threadsafe(_deliver, failed)

    def _token_text(self, token_id: int) -> str:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            return f"token_id:{token_id}"
        return tokenizer.decode([token_id], skip_special_tokens=False)

    def _resolve(self, future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self._loop.call_soon_threadsafe(settle)

    def _refresh_adapters(self) -> None:
        self._adapters = {name: str(self.engine.registry.get(name).path) for name in self.engine.list_adapters()}

    def _publish(self) -> None:
        pool = self.engine.pool.stats()
        scheduler = self.engine.scheduler
        self.snapshot = EngineSnapshot(
            running=len(scheduler.running), waiting=len(scheduler.waiting), num_slots=pool.num_slots,
            free_slots=pool.free_slots, kv_slots=pool.kv_slots, adapter_slots=pool.adapter_slots,
            adapters=self._adapters, lora=self.engine.lora_stats(), steps=self.engine.step_stats(),
        )


def _deliver(deliveries: list[tuple[asyncio.Queue, Update]]) -> None:
    for target, update in deliveries:
        target.put_nowait(update)
