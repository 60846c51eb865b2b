"""What a captured decode step runs, checked on the CPU (and replayed for real on a GPU): the static
buffers of `engine/cuda_graphs.py`.

With `cuda_graphs=True` on the CPU the engine runs its decode steps through the graphs' static
batches eagerly (the Triton kernels under the interpreter). Two things make a capture valid and are
tested here: the static path gives the same tokens as the torch reference (buffers filled right,
padding rows harmless, stale rows of an earlier, larger batch ignored), and every launch of a step
(kernel, grid, scalar arguments, tensor shapes) is the same whatever the batch in its bucket, since a
graph replays the launches it recorded.
"""

from __future__ import annotations

import pytest
import torch

from slora import LLM, SamplingParams
from slora.engine.cuda_graphs import StepGraphs

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16], [17, 18], [19, 20, 21], [22, 23, 24, 25, 26, 27]]
NAMES = ["r2", "r8", None, "r16", "r8", "r2"]


def _llm(model_and_adapters, device, backend: str, cuda_graphs: bool | None) -> LLM:
    folder, adapters = model_and_adapters
    return LLM(model=str(folder), device=str(device), dtype="float32", backend=backend, adapters=adapters,
               num_slots=512, max_num_seqs=8, max_lora_rank=16, cuda_graphs=cuda_graphs)


def test_graph_path_matches_torch_backend(model_and_adapters, device, monkeypatch):
    buckets = []
    original = StepGraphs.run

    def run(self, batch, bucket):
        buckets.append((batch.input_ids.numel(), bucket))
        return original(self, batch, bucket)

    monkeypatch.setattr(StepGraphs, "run", run)
    # Different lengths: the batch shrinks from 6 (bucket 8, two padding rows) to 1 as requests end,
    # so later steps run over buffers that still hold an earlier, larger batch's rows.
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 3, 6, 2, 4, 3)]
    expected = [o.token_ids for o in _llm(model_and_adapters, device, "torch", False).generate(PROMPTS, params, NAMES)]
    llm = _llm(model_and_adapters, device, "triton", True)
    assert llm.engine.graphs is not None and llm.engine.graphs.capture == (device.type == "cuda")
    got = [o.token_ids for o in llm.generate(PROMPTS, params, NAMES)]
    assert got == expected
    decode = {(n, size) for n, (kind, size) in buckets if kind == "decode"}
    assert (6, 8) in decode and (1, 1) in decode and (3, 4) in decode  # padded buckets and an exact one
    assert ("mixed", 32) in {key for _, key in buckets}  # the prompts (27 tokens): a mixed graph of 32 tokens
    # A batch without adapters runs the graph without LoRA launches, and gives the same tokens too.
    base = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)] * 2
    assert ([o.token_ids for o in llm.generate(PROMPTS[:2], base)] ==
            [o.token_ids for o in _llm(model_and_adapters, device, "torch", False).generate(PROMPTS[:2], base)])


def _record_launches(monkeypatch, watched: tuple[str, int]) -> list[list]:
    """The launches (kernel, grid, scalars, tensor shapes) of the first two steps with LoRA that run the
    graph `watched`, through Triton's interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[list] = []
    recording = {"on": False}
    original_launch = InterpretedFunction.run

    def describe(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype)
        return value

    def launch(self, *args, grid, warmup, **kwargs):
        if recording["on"]:
            launches[-1].append((self.fn.__name__, tuple(grid), [describe(a) for a in args],
                                 {k: describe(v) for k, v in kwargs.items()}))
        return original_launch(self, *args, grid=grid, warmup=warmup, **kwargs)

    original_run = StepGraphs.run

    def run(self, batch, key):
        if key == watched and batch.lora is not None and len(launches) < 2 and not recording["on"]:
            launches.append([])
            recording["on"] = True
            try:
                return original_run(self, batch, key)
            finally:
                recording["on"] = False
        return original_run(self, batch, key)

    monkeypatch.setattr(InterpretedFunction, "run", launch)
    monkeypatch.setattr(StepGraphs, "run", run)
    return launches


INTERPRETER_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="records launches through Triton's "
                                      "interpreter; on a GPU test_graph_path_matches_torch_backend checks the replays")


@INTERPRETER_ONLY
def test_decode_launches_do_not_depend_on_the_batch(model_and_adapters, device, monkeypatch):
    """Two decode steps of bucket 8 with other sequences, adapters, ranks and contexts launch the same kernels
    with the same grids, scalars and shapes: what a captured graph needs to stay right at every replay."""
    launches = _record_launches(monkeypatch, ("decode", 8))
    llm = _llm(model_and_adapters, device, "triton", True)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate(PROMPTS[:6], params, NAMES)  # 6 sequences, three adapters
    llm.generate([p + [30, 31] for p in PROMPTS[:5]], params, ["r16", "r16", "r2", None, "r2"])  # 5: other ones
    assert len(launches) == 2 and launches[0]
    assert launches[0] == launches[1]


@INTERPRETER_ONLY
def test_mixed_launches_do_not_depend_on_the_batch(model_and_adapters, device, monkeypatch):
    """The same for two steps of the mixed graph of 32 tokens: six prompts alone (27 tokens), then three
    decoding sequences with two prompt chunks of other adapters (25 tokens)."""
    launches = _record_launches(monkeypatch, ("mixed", 32))
    llm = _llm(model_and_adapters, device, "triton", True)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate(PROMPTS[:6], params, NAMES)
    engine = llm.engine
    for prompt, name in zip(PROMPTS[:3], ["r16", None, "r2"]):
        engine.add_request(prompt, params, name)
    engine.step()  # their prompts: 12 tokens, the graph of 16
    engine.add_request(list(range(40, 50)), params, "r8")
    engine.add_request(list(range(50, 62)), params, "r2")
    engine.step()
    while engine.has_unfinished():
        engine.step()
    assert len(launches) == 2 and launches[0]
    assert launches[0] == launches[1]


def test_graph_path_under_preemption(model_and_adapters, device, monkeypatch):
    """A pool too small for the whole batch: sequences are preempted, recomputed and rejoin the decode
    batches (other rows, other buckets), their recomputation running in mixed graphs beside decoding
    rows; the tokens are still the reference's."""
    mixed_with_decoding = []
    original = StepGraphs.run

    def run(self, batch, key):
        if key[0] == "mixed" and batch.attention.slot_table.num_decode:
            mixed_with_decoding.append(key)
        return original(self, batch, key)

    monkeypatch.setattr(StepGraphs, "run", run)
    folder, adapters = model_and_adapters
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = {}
    for backend, graphs in (("torch", False), ("triton", True)):
        llm = LLM(model=str(folder), device=str(device), dtype="float32", backend=backend, adapters=adapters,
                  num_slots=90, max_num_seqs=8, max_lora_rank=16, cuda_graphs=graphs)
        outputs[backend] = [o.token_ids for o in llm.generate(PROMPTS, params, NAMES)]
        assert llm.engine.scheduler.num_preemptions > 0
    assert outputs["triton"] == outputs["torch"]
    assert mixed_with_decoding


def test_graph_path_keeps_the_chosen_lora_form(model_and_adapters, device):
    folder, adapters = model_and_adapters
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    expected = [o.token_ids for o in _llm(model_and_adapters, device, "torch", False).generate(PROMPTS[:3], params,
                                                                                             NAMES[:3])]
    llm = LLM(model=str(folder), device=str(device), dtype="float32", backend="triton", adapters=adapters,
              num_slots=512, max_num_seqs=4, max_lora_rank=16, cuda_graphs=True, lora_kernel="token")
    assert [o.token_ids for o in llm.generate(PROMPTS[:3], params, NAMES[:3])] == expected
    # (On CUDA the engine also recorded each bucket without LoRA at start-up.)
    recorded = llm.engine.graphs._graphs.items()
    assert {static.lora.form for (_, _, lora), (_, static, _) in recorded if lora} == {"token"}


def test_graphs_recorded_ahead_serve_every_step(model_and_adapters, device):
    """`record_all` records every bucket with and without LoRA over static tables that hold no adapter yet
    (rank 0 everywhere); the decode steps that follow, with adapters and without, record nothing more and
    give the reference's tokens. On CUDA the engine has called it at start-up; on the CPU it has not."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 3, 6, 2, 4, 3)]
    base = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)] * 2
    reference = _llm(model_and_adapters, device, "torch", False)
    expected = [o.token_ids for o in reference.generate(PROMPTS, params, NAMES)]
    expected_base = [o.token_ids for o in reference.generate(PROMPTS[:2], base)]
    llm = _llm(model_and_adapters, device, "triton", True)
    graphs = llm.engine.graphs
    every = {("decode", bucket, lora) for bucket in (1, 2, 4, 8) for lora in (False, True)}
    every |= {("mixed", size, lora) for size in graphs.token_buckets for lora in (False, True)}
    assert set(graphs._graphs) == (every if graphs.capture else set())
    graphs.record_all()
    assert set(graphs._graphs) == every
    assert [o.token_ids for o in llm.generate(PROMPTS, params, NAMES)] == expected
    assert [o.token_ids for o in llm.generate(PROMPTS[:2], base)] == expected_base
    assert set(graphs._graphs) == every and graphs.replays > 0
    assert llm.engine.step_stats()["graphs_captured"] == (len(every) if graphs.capture else 0)


def test_every_static_batch_runs_before_any_step(model_and_adapters, device):
    """A capture runs each graph's static batch before any step has filled it: with more decode rows
    than a mixed graph has tokens (32 against 16), every row must still read and write inside its
    buffers (under the interpreter a load or store past them faults). What the rows compute is
    padding: no step samples it."""
    folder, adapters = model_and_adapters
    llm = LLM(model=str(folder), device=str(device), dtype="float32", backend="triton", adapters=adapters,
              num_slots=512, max_num_seqs=32, max_num_batched_tokens=32, max_lora_rank=16, cuda_graphs=True)
    graphs = llm.engine.graphs
    assert graphs.token_buckets == (16, 32)
    for with_lora in (False, True):
        static = graphs._static_batch("mixed", 16, with_lora)
        assert llm.engine.model(static).shape[0] == static.logits_indices.numel()
