"""Turn one engine step's logits into one token per request.

Every request in the batch brings its own `SamplingParams`, so each stage works on the whole
`[B, V]` tensor with per-row parameters as `[B, 1]` columns, and rows that do not use a stage skip
it. The only Python loop over rows is the `torch.multinomial` call for requests with their own
seeded generator, which is what makes a seeded request reproducible whatever its batch mates are.

Sampling is issued (`launch`) without waiting for the device: every host table reaches it through
pinned memory, and the chosen tokens (and logprobs) come back by copies into pinned buffers that
`SampledTokens.results` waits for. So the engine can issue the next step's forward pass, which
reads the tokens on the device, before it reads them itself (`engine.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slora.engine.sampling_params import SamplingParams
from slora.kernels.metadata import int64_tensor, to_device


@dataclass
class SampleInput:
    """One row of the batch: its parameters and the history that penalties look at."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # from params.seed, on the logits' device; None = global RNG


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None  # of token_id under log_softmax of the raw logits, if logprobs requested
    top_logprobs: dict[int, float] | None  # the params.logprobs most likely raw tokens, if requested


class SampledTokens:
    """One batch's sampled tokens: `token_ids` on the device now, `results()` on the host once the
    copies back are done."""

    def __init__(self, token_ids: torch.Tensor, raw: torch.Tensor, inputs: list[SampleInput]):
        self.token_ids = token_ids  # [B] int64 on the logits' device
        self._logprob_rows = [i for i, inp in enumerate(inputs) if inp.params.logprobs is not None]
        self._top_n = [inputs[i].params.logprobs for i in self._logprob_rows]
        copies = [token_ids]
        if self._logprob_rows:
            rows = int64_tensor(self._logprob_rows, raw.device)
            logprobs = raw[rows].log_softmax(dim=-1)
            chosen = logprobs.gather(1, token_ids[rows, None]).squeeze(1)
            top_values, top_ids = logprobs.topk(max(self._top_n), dim=-1)
            copies += [chosen, top_values, top_ids]
        on_cuda = token_ids.device.type == "cuda"
        self._host = [torch.empty(c.shape, dtype=c.dtype, pin_memory=on_cuda) for c in copies]
        for host, copy in zip(self._host, copies):
            host.copy_(copy, non_blocking=on_cuda)
        self._copied = torch.cuda.Event() if on_cuda else None
        if self._copied is not None:
            self._copied.record()

    def results(self) -> list[SampleResult]:
        """Wait for the tokens (and logprobs) to reach the host; attach raw-distribution logprobs to
        the rows that asked for them."""
        if self._copied is not None:
            self._copied.synchronize()
        lists = [host.tolist() for host in self._host]
        results = [SampleResult(token_id=t, logprob=None, top_logprobs=None) for t in lists[0]]
        if self._logprob_rows:
            chosen, top_values, top_ids = lists[1:]
            for j, (i, n) in enumerate(zip(self._logprob_rows, self._top_n)):
                results[i].logprob = chosen[j]
                results[i].top_logprobs = dict(zip(top_ids[j][:n], top_values[j][:n]))
        return results


def sample(
    logits: torch.Tensor, inputs: list[SampleInput], eos_token_ids: tuple[int, ...] = ()
) -> list[SampleResult]:
    """Pick the next token of every row of `logits` ([B, V]) as its `inputs` row asks."""
    return launch(logits, inputs, eos_token_ids).results()


def launch(logits: torch.Tensor, inputs: list[SampleInput], eos_token_ids: tuple[int, ...] = ()) -> SampledTokens:
    """`sample`, issued on the device without waiting for it."""
    assert logits.dim() == 2 and logits.shape[0] == len(inputs), (logits.shape, len(inputs))
    raw = logits.float()
    logits = apply_penalties(raw, inputs)
    logits = forbid_early_stop(logits, inputs, eos_token_ids)
    token_ids = logits.argmax(dim=-1)
    sampled_rows = [i for i, inp in enumerate(inputs) if not inp.params.greedy]
    if sampled_rows:
        rows = int64_tensor(sampled_rows, logits.device)
        probs = sampling_probs(logits[rows], [inputs[i].params for i in sampled_rows])
        token_ids[rows] = _draw(probs, [inputs[i].generator for i in sampled_rows])
    return SampledTokens(token_ids, raw, inputs)


def apply_penalties(logits: torch.Tensor, inputs: list[SampleInput]) -> torch.Tensor:
    """Repetition penalty on prompt+output tokens (HF), then frequency/presence on output (OpenAI)."""
    logits = logits.clone()
    rep_rows = [i for i, inp in enumerate(inputs) if inp.params.repetition_penalty != 1.0]
    if rep_rows:
        histories = [inputs[i].prompt_token_ids + inputs[i].output_token_ids for i in rep_rows]
        seen = _token_counts(histories, logits.shape[1], logits.device) > 0
        penalty = _column([inputs[i].params.repetition_penalty for i in rep_rows], logits)
        index = int64_tensor(rep_rows, logits.device)
        rows = logits[index]
        penalised = torch.where(rows > 0, rows / penalty, rows * penalty)
        logits[index] = torch.where(seen, penalised, rows)
    freq_rows = [
        i for i, inp in enumerate(inputs)
        if inp.params.frequency_penalty != 0.0 or inp.params.presence_penalty != 0.0
    ]
    if freq_rows:
        outputs = [inputs[i].output_token_ids for i in freq_rows]
        counts = _token_counts(outputs, logits.shape[1], logits.device)
        freq = _column([inputs[i].params.frequency_penalty for i in freq_rows], logits)
        presence = _column([inputs[i].params.presence_penalty for i in freq_rows], logits)
        logits[int64_tensor(freq_rows, logits.device)] -= freq * counts + presence * (counts > 0)
    return logits


def forbid_early_stop(
    logits: torch.Tensor, inputs: list[SampleInput], eos_token_ids: tuple[int, ...]
) -> torch.Tensor:
    """Mask EOS and stop tokens of rows that have not yet generated `min_tokens` tokens."""
    rows: list[int] = []
    columns: list[int] = []
    for i, inp in enumerate(inputs):
        if len(inp.output_token_ids) < inp.params.min_tokens:
            stop_ids = list(eos_token_ids) + (inp.params.stop_token_ids or [])
            rows += [i] * len(stop_ids)
            columns += stop_ids
    if rows:
        # A tensor of values, not a Python scalar: index_put_ with a scalar waits for the device.
        index = (int64_tensor(rows, logits.device), int64_tensor(columns, logits.device))
        logits[index] = logits.new_full((len(rows),), float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, in vocabulary order ([S, V] -> [S, V])."""
    logits = logits / _column([p.temperature for p in params], logits)
    if all(p.top_k <= 0 and p.top_p == 1.0 for p in params):
        return logits.softmax(dim=-1)
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    top_k = int64_tensor([p.top_k if p.top_k > 0 else vocab for p in params], logits.device)
    ranks = torch.arange(vocab, device=logits.device)
    drop = ranks[None, :] >= top_k[:, None]
    sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # A token stays if the tokens ranked above it do not yet reach top_p; rank 0 always stays.
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    top_p = _column([p.top_p for p in params], logits)
    drop |= (mass_above >= top_p) & (top_p < 1.0)
    drop = drop.scatter(1, sorted_ids, drop)
    return logits.masked_fill(drop, float("-inf")).softmax(dim=-1)


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One multinomial draw per row; rows without a generator share one call on the global RNG."""
    choice = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        index = int64_tensor(unseeded, probs.device)
        choice[index] = torch.multinomial(probs[index], 1).squeeze(1)
    for i, generator in enumerate(generators):
        if generator is not None:
            choice[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
    return choice


def _token_counts(histories: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each history, as a [len(histories), vocab] float tensor (sizes
    from the host, so that nothing waits for the device)."""
    rows = np.repeat(np.arange(len(histories), dtype=np.int64), [len(h) for h in histories])
    flat = np.fromiter((t for h in histories for t in h), dtype=np.int64, count=len(rows))
    counts = torch.zeros(len(histories) * vocab, device=device)
    counts.index_add_(0, to_device(rows * vocab + flat, device), torch.ones(len(rows), device=device))
    return counts.view(len(histories), vocab)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return to_device(np.asarray(values, dtype=np.float32), like.device).to(like.dtype)[:, None]
