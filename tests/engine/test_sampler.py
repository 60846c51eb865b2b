"""Sampler against a per-row, per-token reference on fresh random logits."""

from __future__ import annotations

import math

import pytest
import torch

from slora.engine.sampler import SampleInput, apply_penalties, sample, sampling_probs
from slora.engine.sampling_params import SamplingParams

VOCAB = 50


def _input(params: SamplingParams, prompt=(), output=(), generator=None) -> SampleInput:
    return SampleInput(params, list(prompt), list(output), generator)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_penalties(row: list[float], inp: SampleInput) -> list[float]:
    p = inp.params
    out = list(row)
    for t in set(inp.prompt_token_ids + inp.output_token_ids):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(inp.output_token_ids):
        count = inp.output_token_ids.count(t)
        out[t] -= p.frequency_penalty * count + p.presence_penalty
    return out


def _reference_probs(row: list[float], p: SamplingParams) -> list[float]:
    scaled = [x / p.temperature for x in row]
    order = sorted(range(len(row)), key=lambda t: -scaled[t])
    kept = order[: p.top_k] if p.top_k > 0 else order
    z = sum(math.exp(scaled[t]) for t in kept)
    nucleus, mass = [], 0.0
    for t in kept:
        nucleus.append(t)
        mass += math.exp(scaled[t]) / z
        if mass >= p.top_p:
            break
    z = sum(math.exp(scaled[t]) for t in nucleus)
    return [math.exp(scaled[t]) / z if t in nucleus else 0.0 for t in range(len(row))]


def _random_history(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=gen).tolist()


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_penalties_match_reference(batch):
    gen = _seeded(batch)
    logits = torch.randn(batch, VOCAB, generator=gen) * 3
    inputs = [
        _input(
            SamplingParams(
                repetition_penalty=[1.0, 1.3, 0.8][i % 3],
                frequency_penalty=[0.0, 0.5, -1.0, 2.0][i % 4],
                presence_penalty=[0.0, 1.5, -0.5][i % 3],
            ),
            prompt=_random_history(gen, 3 + i),
            output=_random_history(gen, 2 * i),
        )
        for i in range(batch)
    ]
    got = apply_penalties(logits, inputs)
    want = torch.tensor([_reference_penalties(logits[i].tolist(), inp) for i, inp in enumerate(inputs)])
    torch.testing.assert_close(got, want)


def test_penalties_touch_only_history_tokens():
    logits = torch.randn(2, VOCAB, generator=_seeded(0))
    inputs = [
        _input(SamplingParams(repetition_penalty=2.0), prompt=[3, 7], output=[7, 11]),
        _input(SamplingParams(frequency_penalty=1.0, presence_penalty=0.5), prompt=[3], output=[5, 5, 9]),
    ]
    changed = (apply_penalties(logits, inputs) != logits).nonzero().tolist()
    assert changed == [[0, 3], [0, 7], [0, 11], [1, 5], [1, 9]]
    got = apply_penalties(logits, inputs)
    assert got[1, 5] == pytest.approx(logits[1, 5].item() - 2.5)
    assert got[1, 9] == pytest.approx(logits[1, 9].item() - 1.5)


@pytest.mark.parametrize("batch", [1, 7])
def test_sampling_probs_match_reference(batch):
    gen = _seeded(10 + batch)
    logits = torch.randn(batch, VOCAB, generator=gen) * 2
    params = [
        SamplingParams(
            temperature=[0.5, 1.0, 1.7][i % 3], top_k=[-1, 5, 0, 20][i % 4], top_p=[1.0, 0.9, 0.5][i % 3]
        )
        for i in range(batch)
    ]
    got = sampling_probs(logits, params)
    want = torch.tensor([_reference_probs(logits[i].tolist(), p) for i, p in enumerate(params)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_seeded_sampling_matches_reference_draw():
    gen = _seeded(3)
    logits = torch.randn(4, VOCAB, generator=gen)
    params = [SamplingParams(temperature=0.8, top_k=10, top_p=0.9, seed=s) for s in range(4)]
    results = sample(logits, [_input(p, generator=_seeded(p.seed)) for p in params])
    for i, p in enumerate(params):
        probs = torch.tensor(_reference_probs(logits[i].tolist(), p))
        want = torch.multinomial(probs, 1, generator=_seeded(p.seed)).item()
        assert results[i].token_id == want


def test_greedy_is_argmax_after_penalties():
    logits = torch.randn(6, VOCAB, generator=_seeded(4), dtype=torch.float16)
    inputs = [_input(SamplingParams(temperature=0.0)) for _ in range(3)]
    inputs += [_input(SamplingParams(temperature=0.7, top_k=1)) for _ in range(2)]
    top = logits[5].float().argmax().item()
    penalised = SamplingParams(temperature=0.0, presence_penalty=2.0, repetition_penalty=100.0)
    inputs.append(_input(penalised, output=[top]))
    got = [r.token_id for r in sample(logits, inputs)]
    assert got[:5] == logits[:5].float().argmax(dim=-1).tolist()
    assert got[5] != top
    assert got[5] == apply_penalties(logits.float(), inputs)[5].argmax().item()


def test_seeded_sampling_reproducible_and_seed_dependent():
    logits = torch.randn(1, VOCAB, generator=_seeded(5)).expand(8, VOCAB)
    params = SamplingParams(temperature=1.5, seed=0)

    def draw(seeds: list[int]) -> list[int]:
        inputs = [_input(params, generator=_seeded(s)) for s in seeds]
        return [r.token_id for r in sample(logits[: len(seeds)], inputs)]

    first = draw(list(range(8)))
    assert draw(list(range(8))) == first
    assert len(set(first)) > 1  # same logits, different seeds: not all the same token
    assert draw([3, 0])[0] == first[3]  # a seeded row does not depend on its batch mates


def test_tiny_top_p_keeps_only_argmax():
    logits = torch.randn(3, VOCAB, generator=_seeded(6))
    inputs = [_input(SamplingParams(temperature=2.0, top_p=1e-6), generator=_seeded(i)) for i in range(3)]
    for _ in range(5):
        assert [r.token_id for r in sample(logits, inputs)] == logits.argmax(dim=-1).tolist()


def test_min_tokens_forbids_eos_and_stop_tokens():
    logits = torch.zeros(2, VOCAB)
    logits[:, 2] = logits[:, 9] = 100.0  # EOS and a stop token dominate
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[9])
    results = sample(logits, [_input(params, output=[1]), _input(params, output=[1, 4])], eos_token_ids=(2,))
    assert results[0].token_id not in (2, 9)
    assert results[1].token_id in (2, 9)


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(3, VOCAB, generator=_seeded(7), dtype=torch.bfloat16)
    inputs = [
        _input(
            SamplingParams(temperature=0.9, logprobs=5, repetition_penalty=1.5), prompt=[1, 2], generator=_seeded(0)
        ),
        _input(SamplingParams(temperature=0.0)),
        _input(SamplingParams(temperature=0.0, logprobs=0)),
    ]
    results = sample(logits, inputs)
    raw = logits.float().log_softmax(dim=-1)
    values, ids = raw[0].topk(5)
    assert results[0].logprob == pytest.approx(raw[0, results[0].token_id].item())
    assert results[0].top_logprobs == pytest.approx(dict(zip(ids.tolist(), values.tolist())))
    assert list(results[0].top_logprobs) == ids.tolist()
    assert results[1].logprob is None and results[1].top_logprobs is None
    assert results[2].logprob == pytest.approx(raw[2].max().item())
    assert results[2].top_logprobs == {}


@pytest.mark.parametrize("seeded", [True, False])
def test_sample_frequencies_follow_softmax(seeded):
    vocab, temperature, draws = 6, 0.7, 4000
    logits = torch.randn(1, vocab, generator=_seeded(8))
    torch.manual_seed(9)
    generator = _seeded(9) if seeded else None  # one generator shared by all rows: independent draws
    inputs = [_input(SamplingParams(temperature=temperature), generator=generator) for _ in range(draws)]
    tokens = torch.tensor([r.token_id for r in sample(logits.expand(draws, vocab), inputs)])
    frequencies = torch.bincount(tokens, minlength=vocab).float() / draws
    expected = (logits[0] / temperature).softmax(dim=-1)
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert ((frequencies - expected).abs() <= 5 * sigma + 1e-3).all(), (frequencies, expected)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
        ("seed", 1.5), ("max_tokens", 0), ("min_tokens", -1), ("min_tokens", 17), ("stop", ["ok", ""]),
        ("stop_token_ids", [-1]), ("n", 0), ("logprobs", 21), ("presence_penalty", 2.5),
        ("frequency_penalty", -3), ("repetition_penalty", 0.0),
    ],
)
def test_sampling_params_reject_out_of_range(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_sampling_params_normalise_stop_and_greedy():
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams().stop == []
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(top_k=0).greedy
    assert SamplingParams(max_tokens=None, min_tokens=100, logprobs=20, temperature=5.0).max_tokens is None
