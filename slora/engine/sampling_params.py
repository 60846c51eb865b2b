"""Per-request sampling parameters, validated once at admission.

The server builds one `SamplingParams` from each OpenAI-style request; validating here means the
sampler and detokenizer can trust every field, and a bad request fails with a message that names
the offending parameter before it ever reaches the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_LOGPROBS = 20


def _require(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, with OpenAI/vLLM meanings and ranges."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    seed: int | None = None
    max_tokens: int | None = 16  # None = until the context is full
    min_tokens: int = 0
    stop: str | list[str] | None = None  # normalised to list[str]
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # top logprobs per sampled token; 0 = the sampled token's only
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self._validate()

    def _validate(self) -> None:
        t = self.temperature
        _require(_is_real(t) and t >= 0, "temperature", ">= 0", t)
        _require(_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _require(_is_int(self.top_k) and self.top_k >= -1, "top_k", "-1, 0 (off) or >= 1", self.top_k)
        _require(self.seed is None or _is_int(self.seed), "seed", "an integer or None", self.seed)
        mt = self.max_tokens
        _require(mt is None or (_is_int(mt) and mt >= 1), "max_tokens", ">= 1 or None", mt)
        mn = self.min_tokens
        _require(_is_int(mn) and mn >= 0, "min_tokens", ">= 0", mn)
        _require(mt is None or mn <= mt, "min_tokens", f"<= max_tokens ({mt})", mn)
        _require(
            all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop
        )
        ids = self.stop_token_ids
        _require(
            ids is None or all(_is_int(i) and i >= 0 for i in ids),
            "stop_token_ids", "a list of token ids >= 0 or None", ids,
        )
        _require(_is_int(self.n) and self.n >= 1, "n", ">= 1", self.n)
        lp = self.logprobs
        _require(
            lp is None or (_is_int(lp) and 0 <= lp <= MAX_LOGPROBS),
            "logprobs", f"in 0..{MAX_LOGPROBS} or None", lp,
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_real(value) and -2 <= value <= 2, name, "in [-2, 2]", value)
        rp = self.repetition_penalty
        _require(_is_real(rp) and rp > 0, "repetition_penalty", "> 0", rp)

    @property
    def greedy(self) -> bool:
        """Argmax decoding: sampling would always pick the most likely token anyway."""
        return self.temperature == 0 or self.top_k == 1
