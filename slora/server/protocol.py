"""The OpenAI wire format: request models, their validation, and the error body.

Requests are validated strictly (no type coercion, unknown fields refused) so that a parameter the
server does not understand is never silently ignored: every refusal is an `APIError` whose `param`
names the field. Fields that OpenAI clients send and that do not change the result (`user`,
`metadata`, `store`, ...) are accepted; fields that would change it and that slora does not
implement (`tools`, `logit_bias`, a JSON `response_format`, ...) are refused with a message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slora.engine.sampling_params import SamplingParams

MAX_N = 128  # completions per prompt in the schema; the server's --max-n (smaller) applies on top
MAX_PROMPTS = 256  # prompts in one batched completions request
MAX_STOPS = 16  # stop strings per request: each is searched for after every token
MAX_STOP_LENGTH = 256  # characters of one stop string
MAX_STOP_TOKEN_IDS = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what torch accepts for seeds and token ids
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
               404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error"}

StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]


class APIError(Exception):
    """An error answered as an OpenAI error body with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


# Parameters OpenAI defines that would change the result: accepted only at their neutral value.
_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "only response_format {'type': 'text'} is supported"),
    "tools": (lambda v: not v, "tool calling is not supported"),
    "tool_choice": (lambda v: v in (None, "none"), "tool calling is not supported"),
    "functions": (lambda v: not v, "function calling is not supported"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported"),
    "echo": (lambda v: not v, "echo is not supported"),
    "suffix": (lambda v: not v, "suffix is not supported"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "reasoning_effort": (lambda v: v is None, "reasoning_effort is not supported"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only the text modality is supported"),
}


class _GenerateRequest(_Strict):
    """Fields shared by completions and chat completions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # extensions (vLLM)
    top_k: int = Field(default=-1, le=2**31 - 1)
    min_tokens: int = 0
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, le=INT64_MAX)]], Field(max_length=MAX_STOP_TOKEN_IDS)] \
        | None = None
    # accepted, no effect on the result
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # refused unless neutral (see _NEUTRAL)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        for name, (neutral, message) in _NEUTRAL.items():
            if name in self.model_fields_set and not neutral(getattr(self, name, None)):
                raise APIError(400, message, name, "unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, f"best_of must equal n ({self.n}); slora does not rank candidates", "best_of")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, n=self.n, logprobs=logprobs, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
        )


class CompletionRequest(_GenerateRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: one text or token list, or a batch of them."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty", "prompt")
        if len(p) > MAX_PROMPTS:
            raise APIError(400, f"prompt holds {len(p)} prompts; at most {MAX_PROMPTS} per request", "prompt")
        return list(p)

    def sampling_params(self) -> SamplingParams:
        return sampling_or_400(lambda: self._sampling(self.max_tokens, self.logprobs))


class ChatCompletionRequest(_GenerateRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    modalities: list[str] | None = None

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        renames = {"logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            renames["max_tokens"] = "max_completion_tokens"
        return sampling_or_400(lambda: self._sampling(max_tokens, logprobs), renames)


class LoadAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # sent by some vLLM clients; ignored


RequestT = TypeVar("RequestT", bound=_Strict)


def sampling_or_400(make: Callable[[], SamplingParams], renames: dict[str, str] | None = None) -> SamplingParams:
    """Build SamplingParams; its ValueError names the field first, which becomes the error's param."""
    try:
        return make()
    except ValueError as error:
        message = str(error)
        field = message.split(" ", 1)[0]
        name = (renames or {}).get(field, field)
        raise APIError(400, name + message[len(field):], name, "invalid_value") from None


def parse_body(raw: bytes, model: type[RequestT]) -> RequestT:
    """Parse and validate a JSON body; any problem is a 400 that names the parameter.

    Only standard JSON: NaN/Infinity, invalid UTF-8, nesting past Python's recursion limit and
    integers past Python's digit limit are all refused here, as invalid JSON.
    """
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {error}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    try:
        request = model.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error) from None
    if isinstance(request, _GenerateRequest):
        request.check_supported()
    return request


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def request_schemas() -> dict[str, type[BaseModel]]:
    """The body model of each POST route, for the OpenAPI document."""
    return {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
            "/v1/load_lora_adapter": LoadAdapterRequest, "/v1/unload_lora_adapter": UnloadAdapterRequest}


def _validation_error(error: ValidationError) -> APIError:
    errors = error.errors()
    # The most specific, where a union failed: a broken constraint over "not this type of the union".
    first = max(errors, key=lambda e: (not e["type"].endswith("_type"), len(e["loc"])))
    param = _param_name(first["loc"])
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unsupported parameter: {param}", param, "unsupported_parameter")
    if first["type"] == "missing":
        return APIError(400, f"{param} is required", param, "missing_parameter")
    return APIError(400, f"{param}: {first['msg']}", param, "invalid_value")


def _param_name(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'content', 'list[ContentPart]', 1, 'type') -> 'messages[0].content[1].type'."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "none"):
            name += f".{part}" if name else part
    return name
