"""DLP-LoRA's sentence-level router (ALGORITHMS.md §1, arXiv 2410.01497).

Once per prompt: a frozen encoder embeds the prompt, the MLP head gives p = softmax(f(x)) over
the library's adapters, top-p keeps the smallest most-probable prefix reaching p_top, and the
kept probabilities become fusion weights used in every layer for the whole generation.

Beyond the paper, the router abstains when no adapter fits (the library's general adapter serves
the prompt, or the base model alone when it names none): a
classifier always names *some* class, and a prompt from a task outside the library should not
be forced through a wrong adapter. The calibrated test, on by default for routers trained with
one, is the head's energy score -logsumexp(logits) (Liu et al. 2020, arXiv 2010.03759) against a
threshold set on in-library validation prompts (train.py). Two older tests stay available and
off by default: a low top probability, and an embedding far from every adapter's centroid.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

from ...errors import LoramuxError
from ..routing import WEIGHTINGS, Routing, Weighting, fusion_weights, top_p_select
from .encoder import Encoder, encode_cached, load_encoder
from .head import MlpHead

if TYPE_CHECKING:
    from ...library import Library
    from ...models import BaseModel

KIND = "dlp"
CONFIG_FILE = "router.json"
WEIGHTS_FILE = "router.safetensors"


def energy(logits: torch.Tensor) -> torch.Tensor:
    """Out-of-library score per row: high when no class has a large logit."""
    return -torch.logsumexp(logits.float(), dim=-1)


@dataclass(frozen=True)
class Abstain:
    """The stored out-of-library test: abstain when `score` exceeds the threshold of the adapter the
    head ranks first (`per_adapter`; `threshold` where no validation prompt ranked it first). Each
    adapter's threshold kept `recall` of the in-library validation prompts ranked to it (`n_val` in
    all) when it was set: one global threshold let through the tasks with confident heads and abstained
    on a third of the prompts of others (docs/routing.md)."""

    score: str
    threshold: float
    recall: float
    n_val: int
    per_adapter: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = [self.threshold, *self.per_adapter.values()]
        if self.score != "energy" or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise LoramuxError(f"unknown abstain test {self.score!r} / thresholds {values[:4]!r}; "
                               f"this version reads 'energy' with finite thresholds")

    def limit(self, adapter: str) -> float:
        return self.per_adapter.get(adapter, self.threshold)


@dataclass(frozen=True)
class DlpConfig:
    """How the router turns probabilities into a mixture (can differ per call; not trained)."""

    top_p: float = 0.6  # DLP-LoRA's public code
    top_k: int | None = None  # cap on the number of adapters fused
    weighting: Weighting = "renorm"  # or "softmax" (the public code's flatter weights)
    min_confidence: float | None = None  # abstain when the top probability is below this
    # abstain when the cosine distance to the nearest training centroid exceeds this; "auto":
    # when the prompt lies outside every adapter's radius (its farthest training prompt)
    max_distance: Union[float, str, None] = None
    abstain: bool = True  # apply the router's stored out-of-library threshold, if it has one

    def __post_init__(self) -> None:
        if not 0 < self.top_p <= 1:
            raise LoramuxError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise LoramuxError(f"top_k must be a positive integer or None; got {self.top_k!r}")
        if self.weighting not in WEIGHTINGS:
            raise LoramuxError(f"weighting must be one of {list(WEIGHTINGS)}; got {self.weighting!r}")
        if not isinstance(self.abstain, bool):
            raise LoramuxError(f"abstain must be true or false; got {self.abstain!r}")
        if self.min_confidence is not None and not 0 <= self.min_confidence <= 1:
            raise LoramuxError(f"min_confidence must be in [0, 1] or None; got {self.min_confidence!r}")
        d = self.max_distance
        if d is not None and d != "auto" and not (isinstance(d, (int, float)) and math.isfinite(d) and 0 <= d <= 2):
            raise LoramuxError(f"max_distance must be a cosine distance in [0, 2], 'auto' or None; got {d!r}")


class DlpRouter:
    kind = KIND
    general = ""  # the library's general adapter (set by load): it serves the prompts this router abstains on

    def __init__(self, encoder: Encoder, head: MlpHead, adapters: list[str], centroids: torch.Tensor,
                 radii: torch.Tensor, config: DlpConfig = DlpConfig(), info: dict | None = None,
                 abstain: Abstain | None = None):
        if head.n_out != len(adapters) or centroids.shape != (len(adapters), encoder.dim):
            raise LoramuxError(f"router shapes disagree: head has {head.n_out} outputs, {len(adapters)} adapters, "
                               f"centroids {tuple(centroids.shape)}, encoder dim {encoder.dim}")
        self.encoder, self.head, self.adapters = encoder, head.eval(), list(adapters)
        self.centroids = torch.nn.functional.normalize(centroids.float(), dim=-1)
        self.radii = radii.float()
        self.config = config
        self.info = dict(info or {})
        self.abstain = abstain
        self.stored_dir: str | None = None

    # ------------------------------------------------------------------ routing
    @torch.no_grad()
    def logits(self, prompts: list[str], *, cache: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(head logits (N, K), embeddings (N, d)) for the prompts."""
        if isinstance(prompts, str):
            raise LoramuxError("route() takes a list of prompts; wrap a single prompt in a list")
        emb = encode_cached(self.encoder, list(prompts)) if cache else self.encoder.encode(list(prompts))
        # The head (a ~5M-parameter MLP) runs on the host, where the embeddings come back to.
        return self.head(emb).float(), emb

    def scores(self, prompts: list[str], *, cache: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities (N, K), embeddings (N, d)) for the prompts."""
        logits, emb = self.logits(prompts, cache=cache)
        return torch.softmax(logits, dim=-1), emb

    def route(self, prompts: list[str], config: DlpConfig | None = None, **overrides) -> list[Routing]:
        """One Routing per prompt. `config`/keyword overrides change selection for this call only."""
        logits, emb = self.logits(prompts)
        return self.decide(torch.softmax(logits, dim=-1), emb, config, energies=energy(logits), **overrides)

    def decide(self, probs: torch.Tensor, emb: torch.Tensor | None = None, config: DlpConfig | None = None, *,
               energies: torch.Tensor | None = None, **overrides) -> list[Routing]:
        """Selection on given probabilities (and embeddings, for the distance abstain; energies, for
        the stored out-of-library test, which is skipped without them)."""
        cfg = replace(config or self.config, **overrides) if overrides else (config or self.config)
        if probs.ndim != 2 or probs.shape[1] != len(self.adapters):
            raise LoramuxError(f"probabilities must be (N, {len(self.adapters)}); got {tuple(probs.shape)}")
        dist = None
        if cfg.max_distance is not None:
            if emb is None:
                raise LoramuxError("max_distance needs the prompt embeddings")
            dist = 1.0 - torch.nn.functional.normalize(emb.float(), dim=-1) @ self.centroids.T  # (N, K)
        out = []
        for n in range(probs.shape[0]):
            p = probs[n].tolist()
            named = dict(zip(self.adapters, p))
            top = max(p)
            reason = ""
            first = self.adapters[p.index(top)]
            if cfg.abstain and energies is not None and (why := self._out_of_library(float(energies[n]), first)):
                reason = why
            elif cfg.min_confidence is not None and top < cfg.min_confidence:
                reason = f"top probability {top:.3f} < min_confidence {cfg.min_confidence}"
            elif dist is not None:
                d = dist[n]
                if cfg.max_distance == "auto":
                    if bool((d > self.radii).all()):
                        i = int(torch.argmin(d - self.radii))
                        reason = (f"outside every adapter's training radius (nearest: {self.adapters[i]!r}, "
                                  f"distance {float(d[i]):.3f} > radius {float(self.radii[i]):.3f})")
                elif float(d.min()) > float(cfg.max_distance):
                    i = int(torch.argmin(d))
                    reason = (f"distance {float(d[i]):.3f} to the nearest centroid ({self.adapters[i]!r}) > "
                              f"max_distance {cfg.max_distance}")
            if reason:
                out.append(Routing((), (), named, abstained=True, reason=reason, router=self.kind,
                                   general=self.general))
                continue
            keep = top_p_select(p, cfg.top_p, cfg.top_k)
            weights = fusion_weights([p[i] for i in keep], cfg.weighting)
            out.append(Routing(tuple(self.adapters[i] for i in keep), tuple(weights), named, router=self.kind,
                               reason=f"top-p {cfg.top_p} kept {len(keep)} of {len(p)} ({cfg.weighting} weights)"))
        return out

    def _out_of_library(self, score: float, first: str) -> str:
        """Why the stored test sends a prompt to the base model ("" when an adapter fits, or no test is stored)."""
        if self.abstain is None or score <= self.abstain.limit(first):
            return ""
        return (f"no adapter fits: energy {score:.3f} > {self.abstain.limit(first):.3f}, "
                f"above {self.abstain.recall:.0%} of {first!r}'s validation prompts")

    def out_of_library(self, prompts: list[str]) -> list[str]:
        """The stored out-of-library test alone, per prompt: why no adapter fits, or "" when one does
        (always "" for a router stored without a test). Routers that cannot tell for themselves use
        it in front of their own choice (routers/abstention.py)."""
        logits, _ = self.logits(prompts)
        out = []
        for p, e in zip(torch.softmax(logits, dim=-1).tolist(), energy(logits).tolist()):
            out.append(self._out_of_library(e, self.adapters[p.index(max(p))]))  # first as decide() ranks it
        return out

    # ------------------------------------------------------------------ storage
    def save(self, library: "Library", name: str = KIND) -> Path:
        """Store the router in the library, tied to the adapters (and their weights) it knows."""
        from safetensors.torch import save_file

        def write(d: Path) -> None:
            tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            tensors["centroids"] = self.centroids.contiguous()
            tensors["radii"] = self.radii.contiguous()
            save_file(tensors, str(d / WEIGHTS_FILE), metadata={"format": "pt", "kind": self.kind})
            (d / CONFIG_FILE).write_text(json.dumps({
                "kind": self.kind,
                "encoder": self.encoder.spec,
                "encoder_dim": self.encoder.dim,
                "hidden": list(self.head.hidden),
                "dropout": self.head.dropout,
                "adapters": self.adapters,
                "selection": asdict(self.config),
                "abstain": asdict(self.abstain) if self.abstain else None,
                "info": self.info,
            }, indent=2, sort_keys=True) + "\n")

        return library.save_router(name, self.kind, self.adapters, write)

    @classmethod
    def load(cls, library: "Library", name: str = KIND, *, base: "BaseModel | None" = None,
             encoder: Encoder | None = None, config: DlpConfig | None = None, device: str | None = None,
             adapters_may_differ: bool = False) -> "DlpRouter":
        """Load a stored router; refuses one whose adapters changed since it was trained (unless
        `adapters_may_differ`: a grown library's old router, read to warm-start its successor)."""
        from safetensors.torch import load_file

        # checks sha256 and that the adapters are unchanged
        d = library.router_dir(name, adapters_may_differ=adapters_may_differ)
        meta = json.loads((d / CONFIG_FILE).read_text())
        if meta.get("kind") != cls.kind:
            raise LoramuxError(f"router {name!r} is a {meta.get('kind')!r} router, not {cls.kind!r}")
        if encoder is None or encoder.spec != meta["encoder"]:  # a given encoder is reused only if it is this one
            encoder = load_encoder(meta["encoder"], base=base, device=device)
        if encoder.dim != meta["encoder_dim"]:
            raise LoramuxError(f"router {name!r} expects {meta['encoder_dim']}-dim embeddings from encoder "
                               f"{meta['encoder']!r}; this encoder gives {encoder.dim}")
        tensors = load_file(str(d / WEIGHTS_FILE))
        head = MlpHead(meta["encoder_dim"], len(meta["adapters"]), tuple(meta["hidden"]), meta["dropout"])
        head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        abstain = Abstain(**meta["abstain"]) if meta.get("abstain") else None
        router = cls(encoder, head, meta["adapters"], tensors["centroids"], tensors["radii"],
                     config or DlpConfig(**meta["selection"]), meta.get("info"), abstain)
        router.stored_dir = d.name  # which stored version this is (a server notices a newer one)
        router.general = library.general or ""
        return router
