"""Reading a PEFT LoRA directory safely, and checking it against a base model.

Only safetensors are ever read: a pickled `adapter_model.bin` could run arbitrary code when
loaded, so it is refused with the command that converts it (to be run by someone who trusts it).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LoramuxError

if TYPE_CHECKING:
    import torch

    from ..models import BaseModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FINGERPRINT_KEY = "loramux.base_fingerprint"
BASE_ID_KEY = "loramux.base_model"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>A|B|gate)\.(?P<kind>weight|bias)$")
# Dynamic LoRA's input gate (loramux extension): g(x) = 2·sigmoid(w·x + b) scales the update per
# token; `lora_gate.weight` (1, d_in) and `lora_gate.bias` (1,). PEFT ignores these keys.
_PART = {("A", "weight"): "A", ("B", "weight"): "B", ("gate", "weight"): "gate_w", ("gate", "bias"): "gate_b"}


@dataclass
class PeftFiles:
    config: dict
    tensors: dict[str, "torch.Tensor"]
    metadata: dict[str, str]
    path: Path

    @property
    def base_fingerprint(self) -> str | None:
        return self.metadata.get(FINGERPRINT_KEY)


def convert_command(path: Path) -> str:
    return (
        "python -c \"import torch; from safetensors.torch import save_file; "
        f"save_file(torch.load('{path}/adapter_model.bin', weights_only=True), '{path}/{WEIGHTS_FILE}')\""
    )


def read_peft_dir(path: str | Path) -> PeftFiles:
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_dir():
        raise LoramuxError(f"adapter path {str(path)!r} is not a directory; expected a PEFT adapter dir "
                           f"({CONFIG_FILE} + {WEIGHTS_FILE})")
    if not (path / WEIGHTS_FILE).is_file():
        if (path / "adapter_model.bin").is_file():
            raise LoramuxError(
                f"adapter {str(path)!r} has only a pickled adapter_model.bin; loramux loads safetensors only "
                f"(a pickle can run code). If you trust the file, convert it with:\n  {convert_command(path)}"
            )
        raise LoramuxError(f"adapter dir {str(path)!r} has no {WEIGHTS_FILE}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise LoramuxError(f"adapter dir {str(path)!r} has no {CONFIG_FILE}") from None
    except json.JSONDecodeError as e:
        raise LoramuxError(f"{path / CONFIG_FILE} is not valid JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise LoramuxError(f"adapter {str(path)!r} has peft_type {config.get('peft_type')!r}; only 'LORA' adapters are accepted")
    unsupported = {"modules_to_save": config.get("modules_to_save"),  # full copies of modules, not LoRA factors
                   "use_dora": config.get("use_dora") or None,  # a magnitude vector per module
                   "trainable_token_indices": config.get("trainable_token_indices")}
    named = {k: v for k, v in unsupported.items() if v}
    if named:
        raise LoramuxError(f"adapter {str(path)!r} uses {named}, which loramux does not fuse: it fuses LoRA factors "
                           f"(lora_A, lora_B) of linear layers only")
    try:
        with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoramuxError(f"{path / WEIGHTS_FILE} is corrupted or truncated ({e}); re-export or re-train the adapter") from None
    if not tensors:
        raise LoramuxError(f"{path / WEIGHTS_FILE} holds no tensors")
    return PeftFiles(config=config, tensors=tensors, metadata=metadata, path=path)


def lora_factors(files: PeftFiles) -> dict[str, dict[str, "torch.Tensor"]]:
    """module name -> {"A": lora_A, "B": lora_B} (+ "gate_w", "gate_b" for a Dynamic LoRA input
    gate); refuses tensors that are not LoRA factors of a linear layer."""
    out: dict[str, dict[str, "torch.Tensor"]] = {}
    for key, t in files.tensors.items():
        m = _KEY.match(key)
        part = _PART.get((m["which"], m["kind"])) if m else None
        if part is None:
            raise LoramuxError(f"{files.path / WEIGHTS_FILE}: tensor {key!r} is not a LoRA factor of a linear layer "
                               f"(base_model.model.<module>.lora_A/B.weight); modules_to_save and embedding "
                               f"adapters are not supported")
        out.setdefault(m["module"], {})[part] = t
    for module, ab in out.items():
        if not {"A", "B"} <= set(ab) or len({"gate_w", "gate_b"} & set(ab)) == 1:
            raise LoramuxError(f"{files.path / WEIGHTS_FILE}: module {module!r} has {sorted(ab)}; expected lora_A "
                               f"and lora_B (and, for an input gate, both lora_gate.weight and .bias)")
    return out


def lora_shapes(files: PeftFiles) -> dict[str, dict[str, tuple[int, ...]]]:
    """module name -> {"A": shape, "B": shape} (see lora_factors)."""
    return {module: {k: tuple(t.shape) for k, t in ab.items()} for module, ab in lora_factors(files).items()}


def _target_suffixes(config: dict) -> list[str]:
    targets = config.get("target_modules") or []
    return [targets] if isinstance(targets, str) else list(targets)


def check_against_base(files: PeftFiles, base: "BaseModel") -> None:
    """Refuse an adapter made for another base model, or whose modules/shapes don't fit this one."""
    where = str(files.path)
    if files.base_fingerprint and files.base_fingerprint != base.fingerprint:
        raise LoramuxError(
            f"adapter {where!r} was trained on base model {files.metadata.get(BASE_ID_KEY, '?')!r} "
            f"(fingerprint {files.base_fingerprint}); this base model {base.model_id!r} has fingerprint "
            f"{base.fingerprint}. Use the base it was trained on."
        )
    linears = base.linear_shapes()
    suffixes = {name.rsplit(".", 1)[-1] for name in linears}
    targets = _target_suffixes(files.config)
    if isinstance(files.config.get("target_modules"), str):  # a regex: checked through the modules below
        targets = []
    missing = [t for t in targets if t not in suffixes and t not in linears]
    if missing:
        raise LoramuxError(f"adapter {where!r} targets module(s) {missing} that base model {base.model_id!r} lacks; "
                           f"its linear modules are {sorted(suffixes)}")
    for module, ab in lora_shapes(files).items():
        if module not in linears:
            raise LoramuxError(f"adapter {where!r} has weights for module {module!r}, which base model "
                               f"{base.model_id!r} does not have as a linear layer")
        d_in, d_out = linears[module]
        (r_a, a_in), (b_out, r_b) = ab["A"], ab["B"]
        if a_in != d_in or b_out != d_out or r_a != r_b:
            raise LoramuxError(
                f"adapter {where!r}, module {module!r}: lora_A {ab['A']} / lora_B {ab['B']} do not fit the base "
                f"layer (in={d_in}, out={d_out}); expected lora_A (r, {d_in}) and lora_B ({d_out}, r)"
            )
        if "gate_w" in ab and (ab["gate_w"] != (1, d_in) or ab["gate_b"] != (1,)):
            raise LoramuxError(f"adapter {where!r}, module {module!r}: input gate {ab['gate_w']} / {ab['gate_b']}; "
                               f"expected lora_gate.weight (1, {d_in}) and lora_gate.bias (1,)")


def pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key names the module exactly or is a regex for
    its trailing part (e.g. "q_proj" or "layers.0.self_attn.q_proj")."""
    if module in pattern:
        return pattern[module]
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def module_scaling(config: dict, module: str, rank: int) -> float:
    """The scale PEFT applies to `module`'s update: alpha / r, or alpha / sqrt(r) with rsLoRA,
    alpha from alpha_pattern where it names the module (r is the module's own rank)."""
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
