"""LLMEngine: add requests, abort them, and advance every running request by one step.

One `step()` schedules a batch (continuous batching), runs the model once over it, samples the
next token of every request whose sequence is complete in the pool, and reports what changed.
Requests are validated on arrival, so that one bad prompt fails alone and never enters a batch.

Steps overlap: the host prepares and issues step n+1 while the device still computes step n. A
step's sampled tokens stay on the device (`Request.pending_tokens`); the next step is scheduled as
if each of them were known and reads them on the device, and only then does the engine wait for
step n's tokens and append them (stop tokens, stop strings, reporting). Nothing on that path waits
for the device before the wait for the tokens (every host table goes through pinned memory), so
the device runs step n+1 right after step n instead of idling while the host schedules. What this
costs: a request that samples a stop token (or is aborted) has already been scheduled once more;
that token's work is thrown away. A request's last token by max_tokens or the context is known in
advance and never scheduled again.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from slora.config import EngineConfig
from slora.engine.batch import PendingTokens, build_forward_batch
from slora.engine.cuda_graphs import GraphLimits, StepGraphs
from slora.engine.detokenizer import IncrementalDetokenizer
from slora.engine.request import CompletionOutput, Request, RequestOutput
from slora.engine.sampler import SampledTokens, SampleInput, SampleResult, launch
from slora.engine.sampling_params import SamplingParams
from slora.engine.scheduler import ScheduledBatch, Scheduler
from slora.kernels.backend import select_backend
from slora.kernels.metadata import int64_tensor
from slora.lora.registry import AdapterRegistry, UnknownAdapterError
from slora.lora.residency import AdapterResidency
from slora.lora.store import HostStore
from slora.memory.pool import UnifiedPool
from slora.models.loader import LoadedModel, load_model

__all__ = ["LLMEngine", "RequestError", "UnknownAdapterError", "resolve_dtype"]

logger = logging.getLogger("slora.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RequestError(ValueError):
    """A request that cannot be served as given; the message says which input and why."""


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


@dataclass
class _SampledStep:
    """A step's sampled tokens on their way to the host: row i of the parts, in order, is `requests[i]`'s
    token (one part, or one per request where the batch had to be sampled row by row)."""

    requests: list[Request]
    parts: list[SampledTokens]

    def pending(self) -> PendingTokens:
        ids = [part.token_ids for part in self.parts]
        return PendingTokens({r: i for i, r in enumerate(self.requests)}, ids[0] if len(ids) == 1 else torch.cat(ids))

    def results(self) -> list[SampleResult]:
        return [result for part in self.parts for result in part.results()]


@dataclass
class _Group:
    """The n sequences generated for one prompt."""

    request_id: str
    prompt_token_ids: list[int]
    members: list[Request]
    adapter: str | None


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        max_len = config.scheduler.max_model_len
        self.loaded = loaded or load_model(config.model, self.device, self.dtype, max_len)
        self.arch = self.loaded.arch
        self.model_config = self.loaded.config
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = min(max_len or self.model_config.max_position_embeddings, self.model.rotary.cos.shape[0])
        self.pool = UnifiedPool.create(self.model_config, config.pool, self.dtype, self.device)
        self.registry = AdapterRegistry(self.arch, config.lora.max_lora_rank)
        store = HostStore(self.arch, self.dtype, self.device.type == "cuda", config.lora.max_cpu_adapters)
        self.residency = AdapterResidency(self.registry, store, self.pool)
        self.scheduler = Scheduler(config.scheduler, self.pool, self.residency, self.max_model_len)
        for name, path in config.lora.adapters.items():
            self.registry.add(name, path)
        if config.lora.lora_dir:
            self.registry.add_folder(config.lora.lora_dir)
        self._groups: dict[str, _Group] = {}
        self._ids = itertools.count()
        self.num_steps = 0  # steps that ran a forward pass
        self._sampled: _SampledStep | None = None  # the last step's tokens, not yet read back
        self.backend = select_backend(config.backend, self.device, config.lora_kernel)
        self.backend.precompile(self.pool.layers[0], self.arch)
        self.graphs = self._step_graphs()
        torch.manual_seed(config.seed)

    def _step_graphs(self) -> StepGraphs | None:
        """CUDA graphs for steps, when the config and the device call for them (see EngineConfig)."""
        wanted = self.config.cuda_graphs if self.config.cuda_graphs is not None else self.device.type == "cuda"
        if not wanted or self.backend.graph_lora_form is None:
            return None
        limits = GraphLimits(max_batch=self.config.scheduler.max_num_seqs, max_context=min(self.max_model_len, 16384),
                             max_lora_rank=self.config.lora.max_lora_rank,
                             row_capacity=self.pool.rows(0).shape[0], num_layers=self.model_config.num_layers,
                             num_modules=len(self.arch.targets), scale=self.model_config.head_dim**-0.5,
                             max_tokens=self.config.scheduler.max_num_batched_tokens)
        graphs = StepGraphs(self.model, self.pool.layers, limits, self.pool.scratch_slot, self.backend,
                            capture=self.device.type == "cuda")
        if graphs.capture and self.config.capture_graphs_at_start:  # with LoRA too: adapters may come at run time
            graphs.record_all()
        return graphs

    # --- requests --------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        self._validate_prompt(prompt_token_ids, adapter)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._groups:
            raise RequestError(f"request_id {request_id!r} is already in use")
        members = [self._new_request(f"{request_id}/{i}", request_id, prompt_token_ids, params, i, adapter)
                   for i in range(params.n)]
        self._groups[request_id] = _Group(request_id, list(prompt_token_ids), members, adapter)
        for member in members:
            self.scheduler.add(member)
        return request_id

    def _validate_prompt(self, prompt_token_ids: list[int], adapter: str | None) -> None:
        if len(prompt_token_ids) == 0:
            raise RequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestError(
                f"prompt has {len(prompt_token_ids)} tokens; the context is {self.max_model_len}, "
                "which leaves no room for a generated token"
            )
        adapter_slots = self.residency.slots_needed(adapter) if adapter is not None else 0  # raises if unknown
        if len(prompt_token_ids) + adapter_slots >= self.pool.num_slots:
            raise RequestError(f"prompt has {len(prompt_token_ids)} tokens and its adapter takes {adapter_slots} "
                               f"slots; the pool holds {self.pool.num_slots}")

    def _new_request(self, request_id: str, group_id: str, prompt: list[int], params: SamplingParams,
                     index: int, adapter: str | None) -> Request:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt, params.stop, params.skip_special_tokens,
                                                 params.include_stop_str_in_output)
        return Request(request_id, list(prompt), params, detokenizer, generator, adapter, group_id)

    # --- adapters --------------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> None:
        """Register a PEFT adapter folder; raises AdapterError (naming file and problem) if it is bad."""
        self.registry.add(name, path)

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter and free its copies; refused while a request still uses it."""
        self.registry.get(name)
        users = [g.request_id for g in self._groups.values() if g.adapter == name]
        if users:
            raise ValueError(f"adapter {name!r} is in use by {len(users)} unfinished request(s)")
        self.residency.forget(name)
        self.registry.remove(name)

    def list_adapters(self) -> list[str]:
        return self.registry.names()

    def lora_stats(self) -> dict[str, int]:
        pool = self.pool.stats()
        return {
            "registered": len(self.registry), "resident": len(self.residency.resident_names()),
            "host_cached": len(self.residency.store), "loads": self.residency.stats.loads,
            "evictions": self.residency.stats.evictions, "hits": self.residency.stats.hits,
            "prefetches": self.residency.stats.prefetches,
            "disk_loads": self.residency.store.stats.disk_loads,
            "host_evictions": self.residency.store.stats.host_evictions,
            "adapter_slots": pool.adapter_slots, "kv_slots": pool.kv_slots,
        }

    def step_stats(self) -> dict[str, int]:
        """Forward passes so far, how many were replayed as CUDA graphs, graphs captured, and
        forward passes undone for lack of device memory (`Scheduler.back_off`)."""
        graphs = self.graphs
        replayed = graphs.replays if graphs is not None and graphs.capture else 0
        return {"steps": self.num_steps, "graph_steps": replayed,
                "graphs_captured": graphs.captured if graphs is not None else 0,
                "out_of_memory_back_offs": self.scheduler.num_back_offs}

    def abort(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        for member in group.members if group else []:
            if not member.is_finished:
                self.scheduler.finish(member, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()  # a request whose token is pending is still running (or waiting)

    # --- one iteration ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: issue this step's forward pass, then read back and append the last step's
        tokens, then issue this step's sampling (see the module docstring). A failure inside it fails
        the requests it concerns, never the engine: an adapter that cannot be loaded fails its
        request; a failed forward pass fails its batch; a failure while sampling, detokenizing or
        reporting one request fails that request (and its n-siblings) alone. Failed requests finish
        with reason "error", their slots freed."""
        scheduled = self.scheduler.schedule()
        touched = {r.group_id for r in scheduled.preempted + scheduled.finished}
        for request in scheduled.failed:
            touched.add(request.group_id)
            self._fail_group(request.group_id, request.error or "the request could not be scheduled")
        launched, failure = None, None
        try:
            launched = self._run_batch(scheduled, touched)
        except Exception as error:  # the batch as a whole (batch tensors or forward pass) failed
            logger.exception("the forward pass failed; failing the %d requests of its batch", len(scheduled))
            failure = error
        self._append_sampled(touched)  # before a failure ends them: their last step's tokens are theirs
        if failure is not None:
            for group_id in {r.group_id for r in scheduled.requests}:
                touched.add(group_id)
                self._fail_group(group_id, f"the forward pass failed: {type(failure).__name__}: {failure}")
        elif launched is not None:
            self._launch_sampling(*launched)
        outputs = [self._report(self._groups[g]) for g in touched if g in self._groups]
        for output in outputs:
            if output.finished:  # reported for the last time: forget it
                del self._groups[output.request_id]
        return outputs

    def _run_batch(self, scheduled: ScheduledBatch, touched: set[str]) -> tuple[list[Request], torch.Tensor] | None:
        """Issue the step's forward pass; returns the requests that sample and their logits (None if none)."""
        if not scheduled.requests:
            return None
        logits = None
        pending = self._sampled.pending() if self._sampled is not None else None
        try:
            batch, sampling = build_forward_batch(scheduled, self.pool.layers, self.arch, self.backend,
                                                  self.residency, pending)
            graph = self.graphs.bucket(batch) if self.graphs is not None else None
            self.residency.mark_step_issued()
            logits = self.model(batch) if graph is None else self.graphs.run(batch, graph)
        except torch.OutOfMemoryError:
            if sum(scheduled.num_new_tokens) == 1:  # nothing smaller to try: the request fails (in `step`)
                raise
        if logits is None:  # out of device memory; handled outside `except`, whose traceback holds the pass's tensors
            self._back_off(scheduled, touched)
            return None
        self.num_steps += 1
        self.scheduler.step_succeeded()
        self._prefetch_adapters()  # copied while the GPU computes the step just issued
        for request, num_new in zip(scheduled.requests, scheduled.num_new_tokens):
            request.num_computed_tokens += num_new
            touched.add(request.group_id)
        return [scheduled.requests[i] for i in sampling], logits

    def _back_off(self, scheduled: ScheduledBatch, touched: set[str]) -> None:
        """The forward pass ran out of device memory, so nothing of the step was computed: undo it and
        retry smaller (`Scheduler.back_off`: half of the running requests wait and are recomputed, the
        step limits halve and grow back). No request fails and no token changes."""
        if self.device.type == "cuda":  # kernels of the failed pass may still write into the slots freed next
            torch.cuda.synchronize(self.device)
        preempted = self.scheduler.back_off(scheduled)
        touched.update(r.group_id for r in preempted)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.warning("the forward pass of %d sequences ran out of device memory; %d were preempted, the step "
                       "limits are now %d sequences and %d tokens", len(scheduled), len(preempted),
                       self.scheduler.max_num_seqs, self.scheduler.max_num_batched_tokens)

    def _prefetch_adapters(self) -> None:
        """Load the adapters of the next waiting requests ahead; one that cannot be read is left for its
        request's admission to fail, as it would without prefetching."""
        for name in self.scheduler.adapters_to_prefetch(self.config.lora.prefetch):
            try:
                self.residency.prefetch(name)
            except Exception:
                logger.warning("prefetching adapter %r failed; its requests will fail at admission", name,
                               exc_info=True)

    def _launch_sampling(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Issue the sampling of this step's tokens (after the last step's are appended: penalties and
        min_tokens see them) for the requests still running; their tokens stay pending on the device."""
        live = [i for i, r in enumerate(requests) if not r.is_finished]
        if not live:
            return
        if len(live) < len(requests):  # some finished with the last step's tokens: their rows are dropped
            requests = [requests[i] for i in live]
            logits = logits[int64_tensor(live, logits.device)]
        inputs = [SampleInput(r.params, r.prompt_token_ids, r.output_token_ids, r.generator) for r in requests]
        try:
            parts = [launch(logits, inputs, self.model_config.eos_token_ids)]
        except Exception:  # one row broke the batched sampler: sample each row alone to find it
            alone = [(r, self._launch_alone(r, logits[i : i + 1], inputs[i])) for i, r in enumerate(requests)]
            requests, parts = [r for r, t in alone if t is not None], [t for _, t in alone if t is not None]
            if not parts:
                return
        for request in requests:
            request.pending_tokens = 1
            request.last_token_pending = self._ends_after_next_token(request)
        self._sampled = _SampledStep(requests, parts)

    def _launch_alone(self, request: Request, logits: torch.Tensor, row: SampleInput) -> SampledTokens | None:
        try:
            return launch(logits, [row], self.model_config.eos_token_ids)
        except Exception as error:
            self._fail_request(request, "sampling", error)
            return None

    def _append_sampled(self, touched: set[str]) -> None:
        """Wait for the last step's tokens and append them to their requests (unless those finished or
        failed meanwhile); a request whose token cannot be processed fails alone."""
        sampled, self._sampled = self._sampled, None
        if sampled is None:
            return
        for request in sampled.requests:
            request.pending_tokens, request.last_token_pending = 0, False
        try:
            results = sampled.results()
        except Exception as error:
            for request in sampled.requests:
                touched.add(request.group_id)
                if not request.is_finished:
                    self._fail_request(request, "reading its sampled token", error)
            return
        for request, result in zip(sampled.requests, results):
            touched.add(request.group_id)
            if request.is_finished:  # aborted, or failed with a sibling
                continue
            try:
                self._append_token(request, result)
            except Exception as error:
                self._fail_request(request, "processing its new token", error)

    def _append_token(self, request: Request, result: SampleResult) -> None:
        token = result.token_id
        request.output_token_ids.append(token)
        if result.top_logprobs is not None:
            request.logprobs.append({token: result.logprob, **result.top_logprobs})
        ends_here = self._is_stop_token(request, token)
        if not ends_here and request.detokenizer is not None:
            request.detokenizer.add(token)  # a stop token is never part of the text
        reason = "stop" if ends_here else self._limit_reason(request)
        if reason is not None:
            self.scheduler.finish(request, reason)

    def _fail_request(self, request: Request, stage: str, error: Exception) -> None:
        logger.exception("request %s failed while %s", request.request_id, stage)
        self._fail_group(request.group_id, f"request failed while {stage}: {type(error).__name__}: {error}")

    def _fail_group(self, group_id: str, message: str) -> None:
        """Finish every sequence of a prompt with reason "error" and `message`, freeing their slots."""
        group = self._groups.get(group_id)
        for member in group.members if group else []:
            if member.is_finished:
                member.finish_reason, member.error = "error", member.error or message
            else:
                self.scheduler.finish(member, "error", message)

    def _report(self, group: _Group) -> RequestOutput:
        try:
            return self._output(group)
        except Exception as error:  # e.g. the detokenizer's final flush
            logger.exception("reporting request %s failed", group.request_id)
            self._fail_group(group.request_id, f"request failed while reporting: {type(error).__name__}: {error}")
            return self._output(group)

    def _is_stop_token(self, request: Request, token: int) -> bool:
        params = request.params
        stops = token in (params.stop_token_ids or ()) or (
            not params.ignore_eos and token in self.model_config.eos_token_ids)
        return stops and len(request.output_token_ids) > params.min_tokens

    def _ends_after_next_token(self, request: Request) -> bool:
        """Whether the request ends once its next token is appended, whatever that token is."""
        return self._reaches_length_limit(request, len(request.output_token_ids) + 1)

    def _reaches_length_limit(self, request: Request, num_outputs: int) -> bool:
        """Whether `num_outputs` generated tokens reach the request's max_tokens or the context."""
        limit = request.params.max_tokens
        return (limit is not None and num_outputs >= limit) \
            or len(request.prompt_token_ids) + num_outputs >= self.max_model_len

    def _limit_reason(self, request: Request) -> str | None:
        """Why a request that did not sample a stop token ends now, if it does."""
        if request.detokenizer is not None and request.detokenizer.stopped:
            return "stop"
        return "length" if self._reaches_length_limit(request, len(request.output_token_ids)) else None

    def _output(self, group: _Group) -> RequestOutput:
        outputs = []
        for index, member in enumerate(group.members):
            text = member.text
            if member.is_finished and member.error is None and member.detokenizer is not None \
                    and not member.detokenizer.stopped:
                text += member.detokenizer.flush()
            logprobs = member.logprobs if member.params.logprobs is not None else None
            outputs.append(CompletionOutput(index, text, list(member.output_token_ids), member.finish_reason,
                                            logprobs, member.error))
        return RequestOutput(group.request_id, group.prompt_token_ids, outputs, group.adapter)
