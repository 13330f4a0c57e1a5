"""The wire protocol: every request and response body of the server as pydantic models.

This module is the single source of truth: FastAPI validates requests with these models and
generates the OpenAPI document from them, so what the schema says and what the handlers accept
cannot disagree (vLLM's `entrypoints/openai/protocol.py` has the same role). Types are strict, as
OpenAI's own API is: `"seed": "abc"`, `"stop": 5` or `"logprobs": true` on completions are
refused with a 400 that names the field. Fields OpenAI defines and this server does not implement
are accepted at their neutral value and refused otherwise, naming the field.

Limits that depend on the served model (largest `max_tokens`, vocabulary size) are set per app by
`request_models`, so the OpenAPI document states them too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationInfo,
                      create_model, field_validator)

INT64 = 2**63
Finite = Annotated[Union[StrictInt, StrictFloat], Field(allow_inf_nan=False)]
# Mixture weights past this make a LoRA's delta dwarf the base model and its logits overflow.
MAX_WEIGHT = 16.0


def _bounded(w: float) -> float:
    if abs(w) > MAX_WEIGHT:
        raise ValueError(f"a weight must be in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]; got {w!r}")
    return w


# finite first (so NaN is called not finite), then bounded
Weight = Annotated[Union[StrictInt, StrictFloat], Field(allow_inf_nan=False,
                                                        json_schema_extra={"minimum": -MAX_WEIGHT, "maximum": MAX_WEIGHT}),
                   AfterValidator(_bounded)]
Seed = Annotated[StrictInt, Field(ge=-INT64, lt=INT64, description="int64, as OpenAI's API takes it")]
StopString = Annotated[StrictStr, Field(min_length=1, max_length=256)]
Stop = Union[StopString, Annotated[list[StopString], Field(max_length=16)], None]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Open(BaseModel):
    """A request body: OpenAI's clients add fields of their own (`user`, `metadata`, ...), so
    unknown top-level fields are ignored, while every known field is checked strictly."""

    model_config = ConfigDict(strict=True, extra="ignore")


# ---------------------------------------------------------------------------- request parts
class LoramuxOptions(Strict):
    """The `loramux` object of a request (`extra_body={"loramux": {...}}` with the openai client)."""

    mix: dict[Annotated[str, Field(min_length=1)], Weight] | None = Field(
        None, min_length=1, description="An explicit mixture {adapter: weight}; overrides `model`'s choice.")
    explain: StrictBool = Field(False, description="Echo the router's scores and why it chose.")
    top_p: Annotated[Union[StrictInt, StrictFloat], Field(gt=0, le=1)] | None = Field(
        None, description="DLP: keep adapters up to this cumulative probability.")
    top_k: Annotated[StrictInt, Field(ge=1, le=64)] | None = Field(None, description="DLP: at most this many adapters.")
    temperature: Annotated[Union[StrictInt, StrictFloat], Field(gt=0, le=100)] | None = Field(
        None, description="DLP: softmax temperature of the router.")
    abstain: StrictBool | None = Field(
        None, description="false routes even a prompt the out-of-library test would send to the library's general "
                    "adapter or the base model (DLP's own test; for arrow and mole, the library's DLP test in front "
                    "of them).")
    ignore_eos: StrictBool = Field(False, description="Generate past end-of-sequence (benchmarks).")
    timeout_s: Annotated[Union[StrictInt, StrictFloat], Field(gt=0, le=86400)] | None = Field(
        None, description="This request's deadline in seconds (at most the server's own); then 504.")

    def router_options(self) -> dict[str, Any]:
        return {k: v for k in ("top_p", "top_k", "temperature", "abstain") if (v := getattr(self, k)) is not None}


class LoraScale(Strict):
    """llama.cpp server's per-request `lora` entry: an adapter (its id in GET /lora-adapters, or
    its name) and its scale. An alias of `loramux.mix`."""

    id: Union[Annotated[StrictInt, Field(ge=0)], Annotated[StrictStr, Field(min_length=1)]]
    scale: Weight


class StreamOptions(Strict):
    include_usage: StrictBool = False


class ResponseFormat(Strict):
    type: Literal["text"]


class TextPart(Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, Annotated[list[TextPart], Field(min_length=1)], None] = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Common(Open):
    model: Annotated[StrictStr, Field(min_length=1, description="base, an adapter name, or a router "
                                                                "(auto, dlp, arrow, mole, mole:<name>)")]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    temperature: Annotated[Union[StrictInt, StrictFloat], Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Union[StrictInt, StrictFloat], Field(gt=0, le=1)] = 1.0
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stop: Stop = None
    seed: Seed | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    presence_penalty: Annotated[Union[StrictInt, StrictFloat], Field(ge=0, le=0)] | None = Field(
        None, description="Not implemented: only 0 is accepted.")
    frequency_penalty: Annotated[Union[StrictInt, StrictFloat], Field(ge=0, le=0)] | None = Field(
        None, description="Not implemented: only 0 is accepted.")
    logit_bias: Annotated[dict[str, Finite], Field(max_length=0)] | None = Field(
        None, description="Not implemented: only an empty object is accepted.")
    tools: Annotated[list[Any], Field(max_length=0)] | None = Field(None, description="Not implemented: only [].")
    tool_choice: Literal["none", "auto"] | None = Field(None, description="Not implemented: no tools are called.")
    response_format: ResponseFormat | None = Field(None, description="Not implemented: only {\"type\": \"text\"}.")
    loramux: LoramuxOptions = Field(default_factory=LoramuxOptions)
    lora: Annotated[list[LoraScale], Field(max_length=256)] | None = Field(
        None, description="llama.cpp's per-request adapter scales; an alias of loramux.mix.")

    @field_validator("lora")
    @classmethod
    def _one_mixture(cls, lora, info: ValidationInfo):
        options = info.data.get("loramux")
        if lora is not None and options is not None and options.mix is not None:
            raise ValueError("give the mixture once: either 'lora' or 'loramux.mix'")
        return lora

    @field_validator("echo", "logprobs", check_fields=False)  # the subclasses' fields
    @classmethod
    def _not_streamed(cls, value, info: ValidationInfo):
        if value is not None and value is not False and info.data.get("stream"):
            raise ValueError(f"{info.field_name} is not supported with stream; send stream: false")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Common):
    prompt: Union[Annotated[StrictStr, Field(min_length=1)],
                  Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1, max_length=64)],
                  TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1, max_length=64)]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists.")
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=16)] | None = None
    suffix: Annotated[StrictStr, Field(max_length=0)] | None = Field(None, description="Not implemented: only ''.")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, best_of, info: ValidationInfo):
        if best_of is not None and best_of != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported")
        return best_of


class ChatRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top, info: ValidationInfo):
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top


class RoutePreviewRequest(Open):
    model: Annotated[StrictStr, Field(pattern=r"^(auto|dlp|arrow|mole)(:.+)?$",
                                      description="a router: auto, dlp, arrow, mole, mole:<name>")]
    prompt: Annotated[StrictStr, Field(min_length=1)]


class AdapterLoadRequest(Strict):
    name: Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    path: Annotated[StrictStr, Field(min_length=1)]
    expected_version: Annotated[StrictInt, Field(ge=0)] | None = None
    tasks: list[Annotated[StrictStr, Field(min_length=1, max_length=128)]] | None = Field(
        None, max_length=64, description="The tasks the adapter was trained on (a DLP router retrains on them); "
                                         "a replace keeps the old ones when absent.")


def request_models(max_tokens_limit: int, vocab_size: int) -> tuple[type[CompletionRequest], type[ChatRequest]]:
    """The request models of one app: `max_tokens` and token ids bounded by what it serves."""
    limit = Annotated[StrictInt, Field(ge=0, le=max_tokens_limit)] | None
    ids = Annotated[list[Annotated[StrictInt, Field(ge=0, lt=vocab_size)]], Field(min_length=1)]
    prompt = Union[Annotated[StrictStr, Field(min_length=1)],
                   Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1, max_length=64)],
                   ids, Annotated[list[ids], Field(min_length=1, max_length=64)]]
    completion = create_model("CompletionRequest", __base__=CompletionRequest, max_tokens=(limit, None),
                              prompt=(prompt, Field(description=CompletionRequest.model_fields["prompt"].description)))
    at_least_one = Annotated[StrictInt, Field(ge=1, le=max_tokens_limit)] | None
    chat = create_model("ChatRequest", __base__=ChatRequest, max_tokens=(at_least_one, None),
                        max_completion_tokens=(at_least_one, None))
    return completion, chat


# ---------------------------------------------------------------------------- responses
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class RoutingEcho(BaseModel):
    """Which adapters served a request, at which versions, and (with explain) why."""

    model_config = ConfigDict(extra="allow")
    mixture: dict[str, float] | None = None
    adapter_versions: dict[str, int] = {}
    router: str | None = None
    adapters: list[str] | None = None
    weights: list[float] | None = None
    abstained: bool | None = None
    reason: str | None = None
    general: str | None = Field(None, description="abstained: the library's general adapter, which served it")
    explain: dict[str, Any] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class _Choice(BaseModel):
    index: int  # prompt k's j-th sample is choice k * n + j
    finish_reason: Literal["stop", "length"] | None = None
    loramux: RoutingEcho | None = None  # with several prompts: this choice's own routing (the response's is the first's)


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class _Response(BaseModel):
    """What every generation response carries besides its choices."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    loramux: RoutingEcho | None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loramux"
    parent: str | None = None
    root: str | None = None
    kind: Literal["base", "adapter", "router"] = "base"
    version: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoraAdapterInfo(BaseModel):
    """An entry of llama.cpp-compatible GET /lora-adapters: `id` is what a request's `lora` names."""

    id: int
    name: str
    path: str
    scale: float = 0.0


class AdapterLoaded(BaseModel):
    name: str
    version: int
    rank: int


class AdapterUnloaded(BaseModel):
    name: str
    unloaded: bool


class RoutingPreview(BaseModel):
    """What a router chose for a prompt and its scores (`Routing.to_dict`)."""

    model_config = ConfigDict(extra="allow")
    router: str
    adapters: list[str]
    weights: list[float]


# Error responses every generating endpoint documents (schemathesis checks them against this).
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 429, 500, 503, 504)}
