"""Typed values in and out of the engine: what to generate, how, and what came out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import LoramuxError
from ..routers.routing import Routing


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with probability >= top_p
    seed: int | None = None  # per request, so its sample does not depend on its batch-mates
    stop: tuple[str, ...] = ()  # stop strings; the returned text ends before the first one
    ignore_eos: bool = False  # keep going past EOS (benchmarks that need an exact token count)
    logprobs: int | None = None  # report each generated token's log-probability and the top-N alternatives

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise LoramuxError(f"max_new_tokens must be a positive integer; got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise LoramuxError(f"temperature must be a finite number >= 0; got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise LoramuxError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            raise LoramuxError(f"logprobs must be an integer in [0, 20]; got {self.logprobs!r}")
        if any(not s for s in self.stop):
            raise LoramuxError(f"stop strings must be non-empty; got {list(self.stop)!r}")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    mixture: dict[str, float] | None = None  # adapter name -> weight; None: the base model
    sampling: SamplingParams = field(default_factory=SamplingParams)
    chat: bool = True  # wrap the prompt in the model's chat template (when it has one)
    routing: Routing | None = None  # a router's decision; sets the mixture when none is given

    def __post_init__(self) -> None:
        if self.routing is not None:
            if self.mixture is not None and self.mixture != self.routing.mixture:
                raise LoramuxError(f"request gives both a mixture {self.mixture} and a routing whose mixture is "
                                   f"{self.routing.mixture}; give one")
            object.__setattr__(self, "mixture", self.routing.mixture)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    mixture: dict[str, float] | None  # the mixture actually used
    prompt_tokens: int
    seconds_to_first_token: float = 0.0
    seconds: float = 0.0
    routing: Routing | None = None  # the router's decision and scores, when a router chose the mixture
    # with SamplingParams.logprobs: per generated token (its id, log-probability, top-N {id: logprob})
    logprobs: list[tuple[int, float, dict[int, float]]] | None = None
