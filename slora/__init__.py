"""slora: one base LLM, thousands of LoRA adapters, one batch."""

from slora.engine.llm import LLM
from slora.engine.request import RequestOutput
from slora.engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
