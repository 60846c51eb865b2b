"""The scheduler's admission policies, driven without a model: each step's granted tokens are taken as
computed and every sequence that completes its context gets one more token, as the engine does."""

from __future__ import annotations

import random

import pytest
import torch

from slora.config import ModelConfig, SchedulerConfig
from slora.engine.request import Request, RequestStatus
from slora.engine.sampling_params import SamplingParams
from slora.engine.scheduler import Scheduler
from slora.memory.pool import UnifiedPool

MODEL = ModelConfig("llama", vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=1,
                    num_kv_heads=1, head_dim=8, max_position_embeddings=512)


def _serve(num_slots: int, budget: int, requests: list[tuple[int, int | None]], admission: str,
           max_model_len: int = 512, max_steps: int = 20_000) -> tuple[Scheduler, list[Request]]:
    """Serve (prompt length, max_tokens) requests to the end; returns the scheduler and the requests."""
    pool = UnifiedPool(MODEL, num_slots, torch.float32, "cpu")
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=budget, admission=admission),
                          pool, max_model_len=max_model_len)
    made = [Request(str(i), [1] * prompt, SamplingParams(max_tokens=limit, ignore_eos=True), None, None)
            for i, (prompt, limit) in enumerate(requests)]
    for request in made:
        scheduler.add(request)
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return scheduler, made
        batch = scheduler.schedule()
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += num_new
            if request.num_computed_tokens == request.num_tokens:
                request.output_token_ids.append(1)
                limit = request.params.max_tokens
                if (limit is not None and len(request.output_token_ids) >= limit) or \
                        request.num_tokens >= max_model_len:
                    scheduler.finish(request, "length")
    raise AssertionError(f"not done after {max_steps} steps: {len(scheduler.waiting)} waiting, "
                         f"{len(scheduler.running)} running")


def test_reserve_counts_the_steps_a_split_prompt_takes():
    # A request admitted with only a chunk of its prompt starts generating later than one step from
    # now: counted as if it did, the pool ran out at step 5 and preempted it.
    scheduler, _ = _serve(num_slots=10, budget=2, requests=[(1, 6), (3, 4)], admission="reserve")
    assert scheduler.num_preemptions == 0


def test_reserve_runs_requests_bounded_by_the_context_or_larger_than_the_pool():
    # max_tokens=None runs to the context (40 tokens); a request that cannot fit the pool even alone
    # (20 + 100 tokens in 48 slots) starts once nothing runs and is ended by the pool, as the optimistic
    # policy would do; neither holds the queue up forever.
    scheduler, requests = _serve(num_slots=48, budget=16, requests=[(10, None), (20, 100), (5, 3)],
                                 admission="reserve", max_model_len=40)
    assert all(r.status is RequestStatus.FINISHED for r in requests)
    assert [len(r.output_token_ids) for r in requests] == [30, 20, 3]
    scheduler, requests = _serve(num_slots=48, budget=16, requests=[(5, 3), (20, 100), (5, 3)], admission="reserve")
    assert all(r.status is RequestStatus.FINISHED for r in requests)
    assert 0 < len(requests[1].output_token_ids) < 100 and requests[1].finish_reason == "length"


@pytest.mark.parametrize("seed", range(40))
def test_reserve_never_preempts_random_workloads(seed):
    rng = random.Random(seed)
    budget = rng.choice([2, 3, 8, 32])
    requests = [(rng.randint(1, 40), rng.randint(1, 30)) for _ in range(rng.randint(2, 12))]
    num_slots = rng.randint(max(p + m for p, m in requests), 200)  # each fits alone
    scheduler, served = _serve(num_slots, budget, requests, "reserve")
    assert scheduler.num_preemptions == 0
    assert [len(r.output_token_ids) for r in served] == [m for _, m in requests]
