"""A first look on a GPU: the engine on dummy Llama-2-7B shapes and on a tiny model with adapters."""

import sys
import time

import torch

from slora import LLM, SamplingParams

print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
t = time.time()
llm = LLM(model="dummy:llama-2-7b", device="cuda", dtype="float16", pool_memory=0.5, max_num_seqs=64)
print(f"load {time.time() - t:.1f}s slots={llm.engine.pool.num_slots}", flush=True)
prompts = [[1 + (i * 7 + j) % 31999 for j in range(128)] for i in range(64)]
params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
llm.generate(prompts[:2], params)
torch.cuda.synchronize()
t = time.time()
out = llm.generate(prompts, params)
torch.cuda.synchronize()
elapsed = time.time() - t
print(f"64 x (128 in, 32 out): {elapsed:.2f}s, {64 * 32 / elapsed:.0f} tok/s (torch reference kernels)", flush=True)
sys.exit(0 if all(len(o.token_ids) == 32 for o in out) else 1)
