"""S-LoRA's ablations (`lora_kernel="bmm"` / `"padded"`) equal the torch reference, alone and in the engine."""

from __future__ import annotations

import pytest
import torch

from slora import LLM, SamplingParams
from slora.kernels.lora import TorchLoRA, apply_lora
from slora.kernels.lora_ablations import PaddedBmmLoRA
from tests.kernels.helpers import lora_batch, make_adapters, projections, random_pool

KV_HEADS, HEAD_DIM, NUM_LAYERS = 2, 16, 2
SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "down_proj": (16, 80)}
PROJECTIONS = projections(SHAPES, ("q_proj", "k_proj", "v_proj"), ("down_proj",))


@pytest.mark.parametrize("gather", ["token", "adapter"])
def test_ablation_equals_reference(gather, device):
    """Mixed ranks 1..32, per-layer ranks below the module's (their extra pool rows hold random values,
    which the ablations must mask), skipped layers, tokens without an adapter, an adapter in two places."""
    generator = torch.Generator().manual_seed(3)
    pool = random_pool(NUM_LAYERS, 1200, KV_HEADS, HEAD_DIM, torch.float32, device, generator)
    adapters = make_adapters([1, 8, 32, 3], SHAPES, NUM_LAYERS, KV_HEADS * HEAD_DIM, 2400, device, generator)
    token_adapters = [0, 1, 1, None, 2, 3, 1, None, 2]
    batch = lora_batch(token_adapters, adapters, NUM_LAYERS, device)
    reference = TorchLoRA(pool, batch)
    ablation = PaddedBmmLoRA(pool, batch, gather)
    for layer in range(NUM_LAYERS):
        for projection in PROJECTIONS:
            x = torch.randn(len(token_adapters), SHAPES[projection.modules[0]][0], generator=generator).to(device)
            before = torch.randn(len(token_adapters), sum(projection.widths), generator=generator).to(device)
            expected, y = before.clone(), before.clone()
            apply_lora(reference, expected, x, layer, projection)
            apply_lora(ablation, y, x, layer, projection)
            assert (expected - before).abs().max() > 0.1
            # float32, summed in another order (bmm against matmul): within a few ulps of the deltas' size
            torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lora_kernel", ["bmm", "padded"])
def test_engine_ablation_gives_reference_tokens(lora_kernel, model_and_adapters):
    folder, adapters = model_and_adapters
    prompts, names = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15]], ["r2", "r16", None, "r2"]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outputs = {}
    for kernel in ("auto", lora_kernel):
        llm = LLM(model=str(folder), dtype="float32", adapters=adapters, num_slots=256, lora_kernel=kernel)
        outputs[kernel] = [o.token_ids for o in llm.generate(prompts, params, names)]
    assert outputs[lora_kernel] == outputs["auto"]
