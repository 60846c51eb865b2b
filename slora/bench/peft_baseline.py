"""The `peft` baseline: Hugging Face transformers + PEFT, mixed-adapter batches via `adapter_names`.

A Llama of the benchmark model's shape (random weights, like the dummy models) gets one PEFT LoRA
adapter per distinct adapter of the workload, with the same rank and targets (PEFT's own random
initialisation: weights' values do not change the cost). Requests are served in arrival order in
static batches of `batch_size`: prompts left-padded, `generate` with greedy decoding and
`adapter_names`, until the batch's longest output (HF generate cannot drop finished rows). Batch
sizes are swept and the best throughput is reported, as the issue asks.

Each batch size serves the requests in order for at most `time_per_size` seconds (at least one
batch; a batch is cut at the deadline by a stopping criterion and extrapolated to its end at the
pace it had, see `_run_size`).
PEFT runs offline only.
"""

from __future__ import annotations

import gc
import time

import torch
from tqdm import tqdm

from slora.bench.adapters import AdapterSet
from slora.bench.workload import BenchRequest, prompt_tokens
from slora.config import ModelConfig


def hf_llama(config: ModelConfig, device: torch.device | str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def build_peft_model(config: ModelConfig, adapters: AdapterSet, names: list[str], device, dtype):
    from peft import LoraConfig, get_peft_model

    base = hf_llama(config, device, dtype)
    model = None
    with torch.device(device):  # LoRA layers made on the device, not made on the CPU and moved
        for name in names:
            rank = adapters.ranks[name]
            lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(adapters.targets), lora_dropout=0.0,
                              bias="none", task_type="CAUSAL_LM")
            if model is None:
                model = get_peft_model(base, lora, adapter_name=name)
            else:
                model.add_adapter(name, lora)
    return (model if model is not None else base).eval()


class _Deadline:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        done = time.perf_counter() >= self.deadline
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def _generate(model, batch: list[BenchRequest], vocab: int, seed: int, device, deadline: float,
              with_adapters: bool) -> int:
    from transformers import StoppingCriteriaList

    prompts = [prompt_tokens(r, vocab, seed) for r in batch]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    longest = max(r.output_len for r in batch)
    kwargs = {"adapter_names": [r.adapter or "__base__" for r in batch]} if with_adapters else {}
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                         min_new_tokens=longest, do_sample=False, pad_token_id=0,
                         stopping_criteria=StoppingCriteriaList([_Deadline(deadline)]), **kwargs)
    return out.shape[1] - width


def run_peft(config: ModelConfig, adapters: AdapterSet, requests: list[BenchRequest], device, dtype: torch.dtype,
             batch_sizes: list[int], time_per_size: float, seed: int, progress: bool = True) -> dict:
    device = torch.device(device)
    names = sorted({r.adapter for r in requests if r.adapter is not None})
    setup = time.perf_counter()
    model = build_peft_model(config, adapters, names, device, dtype)
    setup = time.perf_counter() - setup
    with_adapters = bool(names)
    try:
        warm = [BenchRequest(0, 0.0, names[0] if names else None, 16, 4)] * 2
        _generate(model, warm, config.vocab_size, seed, device, float("inf"), with_adapters)
        sweep = {}
        for size in tqdm(batch_sizes, desc="peft batch sizes", disable=not progress, leave=False):
            try:
                sweep[size] = _run_size(model, requests, size, time_per_size, config.vocab_size, seed, device,
                                        with_adapters)
            except torch.cuda.OutOfMemoryError as error:  # a larger batch would not fit either
                sweep[size] = {"batch_size": size, "throughput_req_s": 0.0, "error": f"out of memory: {error}"[:200],
                               "truncated": False}
                torch.cuda.empty_cache()
                break
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    best = max(sweep, key=lambda s: sweep[s]["throughput_req_s"])
    if sweep[best]["throughput_req_s"] <= 0:
        raise RuntimeError(f"peft served nothing: {sweep}")
    result = dict(sweep[best])
    result |= {"best_batch_size": best, "setup_s": setup, "adapters_loaded": len(names),
               "sweep": {str(k): v for k, v in sweep.items()}, "truncated": any(v["truncated"] for v in sweep.values())}
    return result


def _run_size(model, requests: list[BenchRequest], size: int, budget: float, vocab: int, seed: int, device,
              with_adapters: bool) -> dict:
    """Serve `requests` in order in batches of `size` for at most `budget` seconds.

    A batch cut at the deadline is extrapolated to its end at its measured pace (static batching:
    it would run until its longest output), so that a cut batch neither inflates nor deflates the
    rate; the result says so (`extrapolated`).
    """
    start = time.perf_counter()
    deadline = start + budget
    elapsed = work = generated = finished = 0.0
    extrapolated = False
    for position in range(0, len(requests), size):
        batch = requests[position : position + size]
        begin = time.perf_counter()
        steps = _generate(model, batch, vocab, seed, device, deadline, with_adapters)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took = time.perf_counter() - begin
        longest = max(r.output_len for r in batch)
        if steps < longest:  # cut at the deadline: finish it on paper at the pace it had
            took *= longest / max(1, steps)
            extrapolated = True
        elapsed += took
        work += len(batch)
        generated += sum(r.output_len for r in batch)
        finished += 0 if steps < longest else len(batch)
        if time.perf_counter() >= deadline:
            break
    return {"batch_size": size, "elapsed_s": elapsed, "throughput_req_s": work / elapsed,
            "output_tok_s": generated / elapsed, "finished": int(finished), "requests": int(work),
            "truncated": extrapolated, "extrapolated": extrapolated}
