"""Triton LoRA kernels (segment and token forms, one module or a fused projection of several) equal the
torch reference on random pools and adapters."""

from __future__ import annotations

import itertools

import pytest
import torch

from slora.kernels import triton_lora
from slora.kernels.lora import LoRABatch, TorchLoRA, apply_lora, read_rows
from slora.kernels.lora import shrink as reference_shrink
from slora.kernels.triton_lora import LoRAKernelConfig, TritonLoRA, shrink
from tests.kernels.helpers import lora_batch, make_adapters, projections, random_pool

KV_HEADS, HEAD_DIM = 2, 16  # kv_dim 32: a pool row
KV_DIM = KV_HEADS * HEAD_DIM
NUM_LAYERS = 2
POOL_SLOTS = 1800  # the adapters below take ~3,100 of its 3,600 rows, shuffled
# One chunk, two chunks, three chunks with padding, narrower than a row.
SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (80, 16), "down_proj": (16, 80)}
# q/k/v fused as the model runs them (one GEMM, modules of different widths), and modules alone.
PROJECTIONS = projections(SHAPES, ("q_proj", "k_proj", "v_proj"), ("o_proj",), ("down_proj",))
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _tokens(pattern: list[tuple[int | None, int]]) -> list[int | None]:
    return [adapter for adapter, count in pattern for _ in range(count)]


# Adapter (index into RANKS) of each flat-batch token, by runs: ranks 1..128 in one batch, a segment
# of one token, one of ~120 tokens, tokens without an adapter, an adapter's tokens in two places.
RANKS = [1, 8, 128, 3, 16]
BATCHES = {
    "mixed": _tokens([(0, 1), (1, 3), (None, 2), (2, 5), (3, 1), (1, 2), (4, 4), (None, 1)]),
    "long_segment": _tokens([(2, 4), (1, 121), (None, 3), (0, 1), (3, 2)]),
    "decode": [4, 0, 1, 3, 2, None],  # one token per adapter
}


def _check(y: torch.Tensor, reference: torch.Tensor, before: torch.Tensor, dtype: torch.dtype) -> None:
    delta = (reference.float() - before.float()).abs().max()
    assert delta > 0.1, "the adapters must change y for the test to mean anything"
    error = (y.float() - reference.float()).abs().max()
    assert error <= TOLERANCE[dtype] * delta, f"max error {error} vs delta {delta}"


def _run(batch_name: str, form: str, dtype: torch.dtype, device: torch.device, seed: int,
         config: LoRAKernelConfig | None = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    pool = random_pool(NUM_LAYERS, POOL_SLOTS, KV_HEADS, HEAD_DIM, dtype, device, generator)
    adapters = make_adapters(RANKS, SHAPES, NUM_LAYERS, KV_DIM, 2 * POOL_SLOTS, device, generator)
    token_adapters = BATCHES[batch_name]
    batch = lora_batch(token_adapters, adapters, NUM_LAYERS, device)
    torch_lora = TorchLoRA(pool, batch)
    triton_lora = TritonLoRA(pool, batch, form=form, config=config)
    for layer in range(NUM_LAYERS):
        for projection in PROJECTIONS:
            in_features = SHAPES[projection.modules[0]][0]
            x = torch.randn(len(token_adapters), in_features, generator=generator).to(device, dtype)
            before = torch.randn(len(token_adapters), sum(projection.widths), generator=generator).to(device, dtype)
            reference, y = before.clone(), before.clone()
            apply_lora(torch_lora, reference, x, layer, projection)
            apply_lora(triton_lora, y, x, layer, projection)
            _check(y, reference, before, dtype)
            untouched = [t for t, a in enumerate(token_adapters) if a is None]
            assert torch.equal(y[untouched], before[untouched])


# The token form is the decode form: its long-segment case is left to the GPU check (interpreter time).
@pytest.mark.parametrize("batch_name, form", [("mixed", "segment"), ("mixed", "token"), ("long_segment", "segment"),
                                              ("decode", "segment"), ("decode", "token")])
def test_lora_equals_reference_fp32(batch_name, form, device):
    _run(batch_name, form, torch.float32, device, seed=hash((batch_name, form)) % 1000)


@pytest.mark.parametrize("form", ["segment", "token"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_equals_reference_half(dtype, form, device):
    _run("mixed", form, dtype, device, seed=7)


@pytest.mark.parametrize("batch_name, form", [("long_segment", "segment"), ("mixed", "token")])
def test_lora_small_blocks_and_splits(batch_name, form, device):
    """Several rank tiles, several K and N steps per chunk, split-K partials, output and token splits."""
    config = LoRAKernelConfig(block_m=16, block_r=16, block_k=16, block_n=16, split_k=3, n_splits=2, m_splits=3)
    _run(batch_name, form, torch.float32, device, seed=3, config=config)


def test_lora_splits_inside_rows_and_past_narrow_modules(device):
    """bf16 with rank tiles of 16, so that ranks 128 and 16 take expand's two loops (several rank tiles,
    one); shrink splits that start inside a pool row (16 of its 32 features); output splits of q/k/v that
    start past k's and v's width."""
    config = LoRAKernelConfig(block_m=16, block_r=16, block_k=16, block_n=16, split_k=4, n_splits=4, m_splits=2)
    _run("mixed", "segment", torch.bfloat16, device, seed=7, config=config)


def _segments(lengths: list[int]) -> LoRABatch:
    """A batch of segments of `lengths` tokens (nothing in it but what launch sizes are chosen from)."""
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.int32)  # noqa: E731
    modules, width = 7, len(lengths)
    starts = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return LoRABatch(adapters=[], row_table=zeros(1), a_offsets=zeros(modules, width), b_offsets=zeros(modules, width),
                     ranks=zeros(1, modules, width), scalings=zeros(1, modules, width).float(),
                     token_indices=torch.arange(sum(lengths), dtype=torch.int32), token_adapters=zeros(sum(lengths)),
                     segment_starts=starts, max_ranks=[[64] * modules], max_segment_len=max(lengths))


PREFILL = [512, 512, 256, 256, 128, 128, 64, 64]  # `slora bench kernels`' prefill case


@pytest.mark.parametrize("lengths, modules, splits", [([4] * 64, 3, 2), ([1] * 256, 3, 2), ([4] * 64, 1, 8),
                                                      ([2] * 128, 3, 1), ([2] * 128, 1, 4), ([2] * 9 + [1] * 110, 3, 1),
                                                      (PREFILL, 3, 2), (PREFILL, 1, 8)])
def test_gpu_expand_splits_are_the_best_measured(monkeypatch, lengths, modules, splits):
    """On a GPU of 132 SMs at Llama-2-7B shapes, q/k/v (3 modules) and o get the output splits that were
    fastest on an H200: 256 decode tokens of 64 or 256 adapters (bench/results/2026-12-01-h200-c6407e2),
    of 128 adapters and 128 decode tokens of 119 (bench/results/2026-12-01-h200-0aa23f1/structure),
    and a 1,920-token prefill of 8 adapters (bench/results/2026-12-01-h200-30dec53/structure)."""
    monkeypatch.setattr(triton_lora, "multiprocessors", lambda device: 132)
    config = triton_lora.choose_config("expand", "segment", _segments(lengths), 4096, 64, 4096, torch.device("cpu"),
                                       num_modules=modules)
    assert config.n_splits == splits


def test_gpu_register_cap_only_where_y_is_pipelined(monkeypatch):
    """On a GPU, expand over 16-token blocks (y through the pipeline) is held to 128 registers a thread,
    the count that kept 4 programs an SM on an H200 (uncapped: 164, and o's expand lost its gain);
    expand over 64-token blocks and shrink keep the compiler's choice. Precompiled variants match."""
    monkeypatch.setattr(triton_lora, "multiprocessors", lambda device: 132)
    cpu = torch.device("cpu")
    decode, prefill = _segments([1] * 256), _segments(PREFILL)
    choose = triton_lora.choose_config
    assert choose("expand", "segment", decode, 4096, 64, 4096, cpu).max_registers == 128
    assert triton_lora.expand_pipelines_y("segment", choose("expand", "segment", decode, 4096, 64, 4096, cpu).block_m)
    assert choose("expand", "segment", prefill, 4096, 64, 4096, cpu).max_registers is None
    assert choose("shrink", "segment", decode, 4096, 64, 4096, cpu).max_registers is None
    assert {(op, c.block_m, c.max_registers) for op, c in triton_lora.compile_variants("segment")} == {
        ("shrink", 16, None), ("shrink", 64, None), ("expand", 16, 128), ("expand", 64, None)}


@pytest.mark.parametrize("form", ["segment", "token"])
def test_shrink_equals_reference(form, device):
    """Shrink's partials: module slot p's splits sum to x @ A^T of that module, token by token."""
    generator = torch.Generator().manual_seed(11)
    pool = random_pool(1, POOL_SLOTS, KV_HEADS, HEAD_DIM, torch.float32, device, generator)
    adapters = make_adapters(RANKS, SHAPES, 1, KV_DIM, 2 * POOL_SLOTS, device, generator)
    batch = lora_batch(BATCHES["mixed"], adapters, 1, device)
    rows = pool[0].view(-1, KV_DIM)
    x = torch.randn(len(BATCHES["mixed"]), 64, generator=generator).to(device)
    projection = PROJECTIONS[0]
    shrunk = shrink(x, rows, batch, 0, projection, form, LoRAKernelConfig(block_k=16, split_k=2))
    assert shrunk.split_k == 2
    for p, module in enumerate(projection.modules):
        v = shrunk.v[p * shrunk.split_k : (p + 1) * shrunk.split_k].sum(0)
        position = 0
        for a in dict.fromkeys(a for a in BATCHES["mixed"] if a is not None):  # segments: in order of first use
            adapter, tokens = adapters[a], [t for t, b in enumerate(BATCHES["mixed"]) if b == a]
            rank = adapter.layer_ranks.get((0, module), 0)
            if rank:
                m = adapter.layout.modules[module]
                a_ids = adapter.row_table[m.a_start : m.a_start + rank * m.a_chunks]
                expected = reference_shrink(x[tokens], rows, a_ids, rank, m.a_chunks)
                torch.testing.assert_close(v[position : position + len(tokens), :rank], expected, rtol=1e-5, atol=1e-5)
            position += len(tokens)


def test_lora_batch_metadata(device):
    """The packed table: row offsets, ranks (0 where an adapter skips a layer), segments."""
    generator = torch.Generator().manual_seed(5)
    adapters = make_adapters([4, 2], SHAPES, NUM_LAYERS, KV_DIM, 400, device, generator)
    batch = lora_batch([1, 0, 1, None, 0], adapters, NUM_LAYERS, device)  # adapter 1 first: order of first use
    assert batch.adapters == [adapters[1].resident, adapters[0].resident]
    assert batch.segment_starts.tolist() == [0, 2, 4]
    assert batch.token_indices.tolist() == [0, 2, 1, 4]
    assert batch.token_adapters.tolist() == [0, 0, 1, 1]
    q = adapters[0].layout.modules["q_proj"]
    assert batch.a_offsets[0, 1].item() == adapters[1].layout.num_rows + q.a_start
    assert torch.equal(batch.row_table[adapters[1].layout.num_rows:].long().cpu(), adapters[0].row_table.cpu())
    for layer in range(NUM_LAYERS):
        for j, adapter in enumerate([adapters[1], adapters[0]]):
            assert batch.ranks[layer, 0, j].item() == adapter.layer_ranks.get((layer, "q_proj"), 0)
    assert batch.max_segment_len == 2


def test_read_rows_reference_gathers_chunks(device):
    """The oracle itself: a 3-chunk row joins its pool rows in order and cuts the padding."""
    rows = torch.arange(10 * 4, dtype=torch.float32, device=device).view(10, 4)
    matrix = read_rows(rows, torch.tensor([7, 2, 5, 0, 9, 1], device=device), rank=2, chunks=3, width=10)
    assert matrix[0].tolist() == rows[[7, 2, 5]].flatten()[:10].tolist()
    assert matrix[1].tolist() == rows[[0, 9, 1]].flatten()[:10].tolist()
