"""The offline API: `LLM(...).generate(prompts)` and `.chat(conversations)` run requests to completion.

A bad prompt in a batch fails alone: its output carries `finish_reason == "error"` and the message,
and the other prompts are served as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from slora.config import EngineConfig, LoRAConfig, PoolConfig, SchedulerConfig
from slora.engine.engine import LLMEngine, RequestError, UnknownAdapterError
from slora.engine.request import CompletionOutput, RequestOutput
from slora.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        *,
        num_slots: int | None = None,
        pool_memory: int | float | str | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        admission: str = SchedulerConfig.admission,
        seed: int = 0,
        adapters: dict[str, str] | None = None,
        lora_dir: str | None = None,
        max_lora_rank: int = 256,
        max_cpu_adapters: int | None = None,
        adapter_prefetch: int = LoRAConfig.prefetch,
        backend: str | None = None,
        cuda_graphs: bool | None = None,
        lora_kernel: str = "auto",
    ):
        config = EngineConfig(
            model=model, device=device, dtype=dtype, seed=seed,
            pool=PoolConfig(num_slots=num_slots, memory=pool_memory),
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, admission),
            lora=LoRAConfig(dict(adapters or {}), lora_dir, max_lora_rank, max_cpu_adapters, adapter_prefetch),
            backend=backend, cuda_graphs=cuda_graphs, lora_kernel=lora_kernel,
        )
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    def add_adapter(self, name: str, path: str) -> None:
        self.engine.add_adapter(name, path)

    def remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | None | Sequence[str | None] = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, str) or _is_token_ids(prompts) else list(prompts)
        params_list = _per_prompt(params or SamplingParams(), len(prompts), "params")
        adapter_list = _per_prompt(adapters, len(prompts), "adapters")
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        for index, (prompt, p, adapter) in enumerate(zip(prompts, params_list, adapter_list)):
            request_id = f"generate-{id(self)}-{index}"
            order.append(request_id)
            try:
                self.engine.add_request(self._encode(prompt), p, adapter, request_id)
            except (RequestError, UnknownAdapterError) as error:
                results[request_id] = _failed(request_id, prompt, str(error), adapter)
        with tqdm(total=len(prompts), disable=not use_tqdm, desc="generate") as progress:
            while self.engine.has_unfinished():
                for output in self.engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        progress.update()
        return [results[request_id] for request_id in order]

    def chat(
        self,
        conversations: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | None | Sequence[str | None] = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, params, adapters, use_tqdm)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model has no chat template; send a plain prompt instead")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _encode(self, prompt: Prompt) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise RequestError(f"model {self.engine.loaded.name} has no tokenizer; give prompts as token ids")
        return self.tokenizer.encode(prompt, add_special_tokens=True)


def _is_token_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) for t in value)


def _per_prompt(value, count: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
        return list(value)
    return [value] * count


def _failed(request_id: str, prompt: Prompt, message: str, adapter: str | None) -> RequestOutput:
    prompt_ids = prompt if isinstance(prompt, list) else []
    return RequestOutput(request_id, prompt_ids, [CompletionOutput(0, "", [], "error", None, message)], adapter)
