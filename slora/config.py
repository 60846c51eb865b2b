"""Configuration dataclasses: the one place where every tunable of the engine is named.

Everything else receives these objects instead of loose keyword arguments, so that a flag of the
CLI, an argument of `LLM(...)` and a field here are the same thing under the same name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("torch", "triton")  # kernel implementations: the torch reference and the Triton kernels
# The LoRA op (`kernels/backend.py`): the Triton backend's kernels ("auto" = the segment form, "segment",
# "token"), or, on either backend, S-LoRA's ablations in plain torch ("bmm", "padded").
LORA_KERNELS = ("auto", "segment", "token", "bmm", "padded")


@dataclass
class ModelConfig:
    """Shape and numerics of a model, read from its `config.json`."""

    architecture: str  # `config.json`'s model_type ("llama", "qwen2", ...): the loader registry's key
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def kv_dim(self) -> int:
        """Elements of one K (or V) vector of one token: the width of one pool row."""
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict; refuse rope scalings the model code cannot run
        (which architectures it can run is the loader's registry's business)."""
        model_type = hf.get("model_type", "")
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = hf.get("rope_scaling") or None
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = dict(rope)
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind in ("default", None):
                rope_scaling = None
            elif kind not in ("llama3", "linear"):
                raise ValueError(f"unsupported rope scaling {kind!r}; slora supports llama3 and linear")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


@dataclass
class PoolConfig:
    """Size of the unified pool: an exact slot count, or a memory budget.

    `memory` is bytes (int, or a string such as "2GiB") or a fraction of the device's free memory
    after the weights (a float in (0, 1]). `num_slots` wins when both are given.
    """

    num_slots: int | None = None
    memory: int | float | str | None = None


ADMISSIONS = ("optimistic", "reserve")


@dataclass
class SchedulerConfig:
    """Continuous batching limits of one engine step, and when a waiting request may start.

    `admission`: "optimistic" starts a request when its prompt fits, and preempts (recomputes) the
    newest running request when the pool later runs out; "reserve" (S-LoRA's router) starts it only
    if every running request and it can reach `max_tokens` without a preemption, counting on the
    slots of those that finish first. "reserve" never recomputes, but its bound is each request's
    max_tokens: it suits workloads whose requests set it close to what they generate.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    admission: str = "optimistic"

    def __post_init__(self) -> None:
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {', '.join(ADMISSIONS)}, got {self.admission!r}")


@dataclass
class LoRAConfig:
    """Adapters known at start-up and the limits on them (vLLM's --max-lora-rank, --max-cpu-loras)."""

    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT folder
    lora_dir: str | None = None  # every sub-folder holding an adapter_config.json is an adapter
    max_lora_rank: int = 256
    max_cpu_adapters: int | None = None  # packed host copies kept; the rest are re-read from disk
    prefetch: int = 4  # adapters of waiting requests loaded ahead per step, while the GPU computes; 0 = off


@dataclass
class EngineConfig:
    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    seed: int = 0
    pool: PoolConfig = field(default_factory=PoolConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    backend: str | None = None  # kernels: "triton" or "torch"; None = "triton" on CUDA, "torch" on CPU
    # Steps as CUDA graphs (Triton backend; decode and mixed, see engine/cuda_graphs.py). None = on CUDA;
    # True on the CPU runs the graphs' static buffers eagerly (how tests check them); False = never.
    cuda_graphs: bool | None = None
    # When steps are captured as CUDA graphs: record every graph (with and without LoRA) while the
    # engine starts, so that no serving step pays for a capture; False = each on its first step.
    capture_graphs_at_start: bool = True
    lora_kernel: str = "auto"  # see LORA_KERNELS; the ablations run without CUDA graphs

    def __post_init__(self) -> None:
        if self.backend not in (None, *BACKENDS):
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (or None for the device's default), "
                             f"got {self.backend!r}")
        if self.lora_kernel not in LORA_KERNELS:
            raise ValueError(f"lora_kernel must be one of {', '.join(LORA_KERNELS)}, got {self.lora_kernel!r}")


@dataclass
class ServerOptions:
    """What `slora serve` adds to the engine: naming, access, and the limits on what one request may cost."""

    served_model_name: str | None = None  # default: the model's folder name
    api_key: str | None = None  # required as `Authorization: Bearer KEY` on /v1/* when set
    adapter_root: str | None = None  # run-time adapter loading only from inside it; off when None
    max_queue: int | None = 1024  # sequences that may wait beyond max_num_seqs (503 beyond); None = no limit
    max_prompt_tokens: int | None = None  # tokens of one prompt; None = the context less one
    max_total_tokens: int | None = None  # prompt + max_tokens of one prompt; None = the context
    max_n: int = 16  # completions per prompt
    max_body_size: int = 4 << 20  # bytes of a request body; more is 413, refused before parsing
    max_concurrency_per_key: int | None = 256  # generation calls in flight per API key (429 beyond); None = no limit
    check_adapter_weights: bool = True  # read every start-up adapter's weights at start (NaN/Inf refused)
    retry_after_s: int = 1
