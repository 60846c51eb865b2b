"""A request's state from arrival to finish, and what the engine reports back about it.

One `Request` is one generated sequence: a prompt with `n > 1` becomes n requests that share a
`group_id`, so the scheduler never needs to know about `n`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from slora.engine.detokenizer import IncrementalDetokenizer
from slora.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class SlotIds:
    """A sequence's pool slots in order, in a growing int32 array: each step reads them as numpy views
    (one copy per sequence into the step's slot table) instead of converting Python ints."""

    def __init__(self) -> None:
        self._array = np.empty(16, dtype=np.int32)
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def extend(self, slot_ids: list[int]) -> None:
        end = self._length + len(slot_ids)
        if end > self._array.size:
            grown = np.empty(max(end, 2 * self._array.size), dtype=np.int32)
            grown[: self._length] = self._array[: self._length]
            self._array = grown
        self._array[self._length : end] = slot_ids
        self._length = end

    def truncate(self, length: int) -> None:
        """Keep the first `length` slots (the caller frees the rest)."""
        self._length = min(self._length, length)

    def view(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Slots `[start, end)` (to the last by default), without a copy."""
        return self._array[start : self._length if end is None else end]

    def tolist(self) -> list[int]:
        return self.view().tolist()


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    generator: torch.Generator | None
    adapter: str | None = None
    group_id: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    slot_ids: SlotIds = field(default_factory=SlotIds)  # pool slots of its K/V, in order
    num_computed_tokens: int = 0  # tokens whose K/V are in `slot_ids`
    holds_adapter: bool = False  # a reference on its adapter's pool residency, while running
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    # A token sampled on the device that the engine has not read back yet (`engine.py`: steps overlap):
    # it counts in `num_tokens` and the next step feeds it from the device; `last_token_pending` says
    # that it ends the request whatever it is (max_tokens or the context), so no step is scheduled for it.
    pending_tokens: int = 0
    last_token_pending: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.pending_tokens

    @property
    def num_known_tokens(self) -> int:
        """Prompt and output tokens on the host (all but the pending one)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Tokens `[start, end)` of prompt + output (on the host: `end <= num_known_tokens`), without
        copying the whole sequence."""
        split = len(self.prompt_token_ids)
        if end <= split:
            return self.prompt_token_ids[start:end]
        if start >= split:
            return self.output_token_ids[start - split : end - split]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - split]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer is not None else ""


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None
    error: str | None = None


@dataclass
class RequestOutput:
    """One prompt's result: `outputs` holds its n completions; the shortcuts read the first."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    adapter: str | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs

    @property
    def error(self) -> str | None:
        return self.outputs[0].error
