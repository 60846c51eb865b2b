"""Iteration-level (continuous) batching: which requests run in the next step, and how many tokens each.

Each step has a token budget (`max_num_batched_tokens`). Running requests go first, oldest first:
a decoding request takes one token, a request still prefilling takes the next chunk of its prompt.
A token the device is still sampling counts as known (`Request.pending_tokens`: the engine overlaps
steps), except that a request whose pending token is its last takes no step.
When the pool has no slot left for a running request, the newest running request is preempted:
its slots are freed and it goes back to the front of the queue, to be recomputed later (its tokens
so far become its prompt again, so the output does not change). Waiting requests are admitted in
arrival order while the budget, `max_num_seqs` and free slots allow, and none was preempted.

Adapters share the pool: admitting a request whose adapter is not resident also costs that
adapter's slots. Idle adapters (no running request) are evicted, least recently used first,
before any request is preempted; a running request's adapter is never evicted. Admission is in
arrival order, so no adapter's requests can starve behind others. A request whose adapter cannot
be loaded (its weights are checked when first read) fails alone, in `ScheduledBatch.failed`.

A forward pass that runs out of device memory is undone rather than failed (`back_off`): the step's
slot grants are freed, the newest half of the running requests are preempted (recomputed later, so
no token changes), and the step limits (sequences, tokens) are halved. They grow back by 1/64 of
their configured values per step that succeeds, up to a ceiling of 3/4 of what failed, so that a
steady load does not run out of memory again and again; the ceiling rises back by 1/1024 of the
configured values per step.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from slora.config import SchedulerConfig
from slora.engine.request import Request, RequestStatus, SlotIds
from slora.lora.residency import AdapterResidency
from slora.memory.pool import UnifiedPool


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)  # finished with an error while being admitted
    finished: list[Request] = field(default_factory=list)  # ended by the pool ("length"): alone, it outgrew it

    def add(self, request: Request, num_tokens: int) -> None:
        self.requests.append(request)
        self.num_new_tokens.append(num_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: UnifiedPool, residency: AdapterResidency | None = None,
                 max_model_len: int | None = None):
        self.config = config
        self.max_model_len = max_model_len or config.max_model_len  # the context: what max_tokens=None may reach
        self.pool = pool
        self.residency = residency
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_back_offs = 0
        self.max_num_seqs = config.max_num_seqs  # the step limits now: lowered by `back_off`, then regrown
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self._ceiling = (config.max_num_seqs, config.max_num_batched_tokens)  # what regrowth stops at

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.last_token_pending:  # it ends with the token the device is sampling: nothing to run
                index += 1
                continue
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self._make_room(num_tokens) and self.running[-1] is not request:
                batch.preempted.append(self._preempt(self.running.pop()))
            if not self._make_room(num_tokens):
                if len(self.running) == 1 and not batch.requests:
                    # Alone and still out of slots: the pool cannot hold this sequence any longer. A
                    # token still on the device is appended first; the next step ends it.
                    if request.pending_tokens:
                        break
                    self.finish(request, "length")
                    batch.finished.append(request)
                    continue
                batch.preempted.append(self._preempt(self.running.pop()))
                break
            self._grant(batch, request, num_tokens)
            budget -= num_tokens
            index += 1
        # The running requests' needs (reserve admission), made once per step and extended as requests start.
        needs = [self._need(r) for r in self.running] if self.config.admission == "reserve" else None
        while self.waiting and budget > 0 and not batch.preempted and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            adapter_slots = self.residency.slots_needed(request.adapter) if request.adapter else 0
            # (Alone, a request starts whatever its bound: the pool then ends it if it outgrows the pool.)
            if needs is not None and self.running and not self._peak_fits(needs, request, adapter_slots):
                break
            if not self._make_room(num_tokens + adapter_slots, keep=request.adapter):
                break
            self.waiting.popleft()
            if request.adapter:
                try:
                    self.residency.acquire(request.adapter)
                except Exception as error:  # its weights cannot be read (corrupt, NaN, gone): it fails alone
                    self._fail_admission(batch, request, f"adapter {request.adapter!r} cannot be loaded: {error}")
                    continue
                request.holds_adapter = True
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._grant(batch, request, num_tokens)
            budget -= num_tokens
            if needs is not None:
                needs.append(self._need(request))
        return batch

    def back_off(self, batch: ScheduledBatch) -> list[Request]:
        """Undo a batch whose forward pass ran out of device memory (nothing of it was computed):
        free its slot grants, preempt the newest half of the running requests and halve the step
        limits. Returns the preempted requests."""
        for request, num_tokens in zip(batch.requests, batch.num_new_tokens):
            if request.status is RequestStatus.RUNNING:
                kept = len(request.slot_ids) - num_tokens
                self.pool.free(request.slot_ids.view(kept).tolist(), "kv")
                request.slot_ids.truncate(kept)
        self.num_back_offs += 1
        seqs, tokens = len(self.running), sum(batch.num_new_tokens)
        self._ceiling = (max(1, 3 * seqs // 4), max(1, 3 * tokens // 4))
        self.max_num_seqs, self.max_num_batched_tokens = max(1, seqs // 2), max(1, tokens // 2)
        preempted = []
        while len(self.running) > self.max_num_seqs:
            preempted.append(self._preempt(self.running.pop()))
        return preempted

    def step_succeeded(self) -> None:
        """Regrow limits lowered by `back_off` (1/64 of their configured values a step) up to the ceiling,
        and the ceiling back to the configured values (1/1024 a step)."""
        configured = (self.config.max_num_seqs, self.config.max_num_batched_tokens)
        if self._ceiling == configured and (self.max_num_seqs, self.max_num_batched_tokens) == configured:
            return
        self._ceiling = tuple(min(c, ceiling + max(1, c // 1024)) for c, ceiling in zip(configured, self._ceiling))
        self.max_num_seqs, self.max_num_batched_tokens = (
            min(ceiling, now + max(1, c // 64)) for c, ceiling, now in
            zip(configured, self._ceiling, (self.max_num_seqs, self.max_num_batched_tokens)))

    def adapters_to_prefetch(self, limit: int) -> list[str]:
        """Adapters of the next waiting requests (at most `max_num_seqs` of them: what the next batches
        admit), not yet resident, that fit in the pool's free slots beyond what those requests and one
        more token of every running one will take."""
        if self.residency is None or limit <= 0:
            return []
        names: list[str] = []
        reserve = len(self.running)
        for request in itertools.islice(self.waiting, self.config.max_num_seqs):
            reserve += request.num_tokens - request.num_computed_tokens
            adapter = request.adapter
            if adapter is None or adapter in names or self.residency.is_resident(adapter):
                continue
            reserve += self.residency.slots_needed(adapter)
            if self.pool.num_free < reserve:
                break
            names.append(adapter)
            if len(names) == limit:
                break
        return names

    def _need(self, request: Request) -> tuple[int, int, int]:
        """(slots held, tokens it has that still need slots, tokens it may yet generate): see `_peak_fits`."""
        held = len(request.slot_ids)
        return held, max(0, request.num_tokens - held), self._output_left(request)

    def _peak_fits(self, needs: list[tuple[int, int, int]], candidate: Request, adapter_slots: int) -> bool:
        """Whether the running requests and `candidate` all reach their last token without running out
        of slots (S-LoRA's admission). Request i holds h_i slots and still needs p_i for the tokens it
        has (its prompt, or the next token: taken now) and d_i for those it may yet generate (one a
        step); after t more steps the pool must hold
        sum over i with d_i >= t of (p_i + t), less the h_i freed by those that finished (d_i < t).
        That is largest at t = 0 or some d_i.

        A request whose prompt is not all in the pool starts generating only once it is: the step's
        token budget goes to prompts oldest first, at least `share` tokens a step, so its last chunk
        comes after ceil(the prompt tokens still to come of it and of those before it / share) steps.
        Its d_i grows by that many: its end comes that much later, and its growth is counted from now
        (more than it can be). Every d_i also counts one step more: see below."""
        held, prompt, output = np.array([*needs, self._need(candidate)], dtype=np.int64).T
        share = max(1, self.max_num_batched_tokens - len(held))
        to_come = np.maximum(prompt - 1, 0)  # prompt tokens after the one the next step may take
        output += np.where(to_come > 0, -(-np.cumsum(to_come) // share), 0)
        # A request's slots are freed one step after its last token is issued (the engine reads that
        # token back while the next step is scheduled): counted as one more step of growth.
        output += 1
        order = np.argsort(output, kind="stable")
        held, prompt, output = held[order], prompt[order], output[order]
        # At t = output[k]: requests k.. are still running (sorted), requests ..k-1 have finished.
        still = prompt[::-1].cumsum()[::-1] + output * np.arange(len(output), 0, -1)
        freed = np.concatenate(([0], held.cumsum()[:-1]))
        peak = max(int(prompt.sum()), int((still - freed).max()))
        available = self.pool.num_free + (self.residency.evictable_slots(candidate.adapter) if self.residency else 0)
        return peak + adapter_slots <= available

    def _output_left(self, request: Request) -> int:
        """Tokens it may still generate beyond the next one, each fed back (the last one never is)."""
        prompt_len = len(request.prompt_token_ids)
        limit = request.params.max_tokens
        if limit is None:  # until the context is full
            limit = (self.max_model_len or 1 << 30) - prompt_len
        return max(0, prompt_len + limit - 1 - request.num_tokens)

    def _make_room(self, num_slots: int, keep: str | None = None) -> bool:
        """True when `num_slots` are free, after evicting idle adapters if that is what it takes."""
        if self.pool.num_free >= num_slots:
            return True
        return self.residency is not None and self.residency.make_room(num_slots, keep)

    def _grant(self, batch: ScheduledBatch, request: Request, num_tokens: int) -> None:
        request.slot_ids.extend(self.pool.allocate(num_tokens, "kv"))
        batch.add(request, num_tokens)

    def _preempt(self, request: Request) -> Request:
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        return request

    def _release(self, request: Request) -> None:
        self.pool.free(request.slot_ids.tolist(), "kv")
        request.slot_ids = SlotIds()
        request.num_computed_tokens = 0
        if request.holds_adapter:
            self.residency.release(request.adapter)
            request.holds_adapter = False

    def _fail_admission(self, batch: ScheduledBatch, request: Request, error: str) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = "error"
        request.error = error
        batch.failed.append(request)

    def finish(self, request: Request, reason: str, error: str | None = None) -> None:
        """End a request (done, aborted or failed) wherever it is, and free its slots."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self._release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.error = error
