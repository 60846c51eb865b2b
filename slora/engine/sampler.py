"""Turn one engine step's logits into one token per request.

Every request in the batch brings its own `SamplingParams`, so each stage works on the whole
`[B, V]` tensor with per-row parameters as `[B, 1]` columns, and rows that do not use a stage skip
it. The only Python loop over rows is the `torch.multinomial` call for requests with their own
seeded generator, which is what makes a seeded request reproducible whatever its batch mates are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slora.engine.sampling_params import SamplingParams


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


def sample(
    logits: torch.Tensor, inputs: list[SampleInput], eos_token_ids: tuple[int, ...] = ()
) -> list[SampleResult]:
    """Pick the next token of every row of `logits` ([B, V]) as its `inputs` row asks."""
    assert logits.dim() == 2 and logits.shape[0] == len(inputs), (logits.shape, len(inputs))
    raw = logits.float()
    logits = apply_penalties(raw, inputs)
    logits = forbid_early_stop(logits, inputs, eos_token_ids)
    token_ids = logits.argmax(dim=-1)
    sampled_rows = [i for i, inp in enumerate(inputs) if not inp.params.greedy]
    if sampled_rows:
        probs = sampling_probs(logits[sampled_rows], [inputs[i].params for i in sampled_rows])
        choice = _draw(probs, [inputs[i].generator for i in sampled_rows])
        token_ids[sampled_rows] = choice
    return _results(raw, token_ids, inputs)


def apply_penalties(logits: torch.Tensor, inputs: list[SampleInput]) -> torch.Tensor:
    """Repetition penalty on prompt+output tokens (HF), then frequency/presence on output (OpenAI)."""
    logits = logits.clone()
    rep_rows = [i for i, inp in enumerate(inputs) if inp.params.repetition_penalty != 1.0]
    if rep_rows:
        histories = [inputs[i].prompt_token_ids + inputs[i].output_token_ids for i in rep_rows]
        seen = _token_counts(histories, logits.shape[1], logits.device) > 0
        penalty = _column([inputs[i].params.repetition_penalty for i in rep_rows], logits)
        rows = logits[rep_rows]
        penalised = torch.where(rows > 0, rows / penalty, rows * penalty)
        logits[rep_rows] = torch.where(seen, penalised, rows)
    freq_rows = [
        i for i, inp in enumerate(inputs)
        if inp.params.frequency_penalty != 0.0 or inp.params.presence_penalty != 0.0
    ]
    if freq_rows:
        outputs = [inputs[i].output_token_ids for i in freq_rows]
        counts = _token_counts(outputs, logits.shape[1], logits.device)
        freq = _column([inputs[i].params.frequency_penalty for i in freq_rows], logits)
        presence = _column([inputs[i].params.presence_penalty for i in freq_rows], logits)
        logits[freq_rows] -= freq * counts + presence * (counts > 0)
    return logits


def forbid_early_stop(
    logits: torch.Tensor, inputs: list[SampleInput], eos_token_ids: tuple[int, ...]
) -> torch.Tensor:
    """Mask EOS and stop tokens of rows that have not yet generated `min_tokens` tokens."""
    for i, inp in enumerate(inputs):
        if len(inp.output_token_ids) < inp.params.min_tokens:
            stop_ids = list(eos_token_ids) + (inp.params.stop_token_ids or [])
            logits[i, stop_ids] = float("-inf")
    return logits


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, in vocabulary order ([S, V] -> [S, V])."""
    logits = logits / _column([p.temperature for p in params], logits)
    if all(p.top_k <= 0 and p.top_p == 1.0 for p in params):
        return logits.softmax(dim=-1)
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=logits.device)
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
        choice[unseeded] = torch.multinomial(probs[unseeded], 1).squeeze(1)
    for i, generator in enumerate(generators):
        if generator is not None:
            choice[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
    return choice


def _results(
    raw: torch.Tensor, token_ids: torch.Tensor, inputs: list[SampleInput]
) -> list[SampleResult]:
    """Attach raw-distribution logprobs to the rows that asked for them."""
    ids = token_ids.tolist()
    results = [SampleResult(token_id=t, logprob=None, top_logprobs=None) for t in ids]
    rows = [i for i, inp in enumerate(inputs) if inp.params.logprobs is not None]
    if not rows:
        return results
    logprobs = raw[rows].log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids[rows, None]).squeeze(1).tolist()
    k = max(inputs[i].params.logprobs for i in rows)
    top_values, top_ids = logprobs.topk(k, dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        n = inputs[i].params.logprobs
        results[i].logprob = chosen[j]
        results[i].top_logprobs = dict(zip(top_ids[j][:n], top_values[j][:n]))
    return results


def _token_counts(histories: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each history, as a [len(histories), vocab] float tensor."""
    lengths = torch.tensor([len(h) for h in histories], device=device)
    tokens = torch.tensor([t for h in histories for t in h], dtype=torch.long, device=device)
    rows = torch.repeat_interleave(torch.arange(len(histories), device=device), lengths)
    counts = torch.bincount(rows * vocab + tokens, minlength=len(histories) * vocab)
    return counts.view(len(histories), vocab).float()


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]
