"""FusedModel: put MultiLoraLinear into a base model and manage adapter slots by name.

    fused = FusedModel(base)                       # wraps every targeted nn.Linear, in place
    fused.load(library, "hyperbaton")              # or fused.add_adapter(name, peft_files)
    with fused.mixture(fused.sequence_mixture([{"hyperbaton": 1.0}, {"a": 0.5, "b": 0.5}])):
        logits = base.model(input_ids).logits      # each row with its own mixture

Slot numbers are the same in every layer; removing an adapter shifts later slots down.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ..errors import LoramuxError
from ..library.checks import PeftFiles, lora_factors, module_scaling, read_peft_dir
from .layer import FusionState, MultiLoraLinear
from .mixture import Mixture, SequenceMixture

if TYPE_CHECKING:
    from ..library import Library
    from ..models import BaseModel

def _return_freed_memory() -> None:
    """Ask glibc to give freed heap pages back to the OS. Restacking slots frees the old stacks,
    and without this a long-running server's resident memory keeps their high-water mark."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to do
            pass


def library_identity(spec) -> str:
    """What a library adapter is, for caches that outlive a process: its dir and files' sha256."""
    return f"{spec.dir}|" + ",".join(f"{f}:{h}" for f, h in sorted(spec.files.items()))


class FusedModel:
    def __init__(self, base: "BaseModel", target_modules: tuple[str, ...] | None = None, *,
                 factor_dtype: torch.dtype = torch.float32):
        """`target_modules`: the projection names to fuse (default: every projection of the
        model's blocks, whatever the family calls them; see BaseModel.projection_names).
        `factor_dtype`: the adapters' factors; fp32 whatever the base's dtype, as PEFT (see layer.py)."""
        self.base = base
        target_modules = base.projection_names() if target_modules is None else target_modules
        self.state = FusionState()
        self.layers: dict[str, MultiLoraLinear] = {}
        self.adapters: list[str] = []  # slot k holds adapters[k]
        # what each loaded adapter is, for caches that outlive this process (None: unknown)
        self.identities: dict[str, str | None] = {}
        # bumped whenever the loaded adapters change: caches of what a mixture computed key on it
        self.version = 0
        for name, module in list(base.model.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if child_name in target_modules and isinstance(child, torch.nn.Linear):
                    layer = MultiLoraLinear(child, full, self.state, factor_dtype)
                    setattr(module, child_name, layer)
                    self.layers[full] = layer
        if not self.layers:
            raise LoramuxError(f"no linear modules named {list(target_modules)} in base model {base.model_id!r}")
        self.target_modules = tuple(sorted({n.rsplit(".", 1)[-1] for n in self.layers}))

    def unfuse(self) -> None:
        """Put the plain linear layers back into the base model (adapters and slots are dropped);
        the base is then as it was before this FusedModel wrapped it."""
        for name, layer in self.layers.items():
            parent, _, child = name.rpartition(".")
            setattr(self.base.model.get_submodule(parent) if parent else self.base.model, child, layer.base)
        self.layers, self.adapters, self.identities = {}, [], {}
        self.version += 1

    # ------------------------------------------------------------------ adapters
    def slot(self, name: str) -> int:
        if name not in self.adapters:
            raise LoramuxError(f"adapter {name!r} is not loaded; loaded adapters: {self.adapters}")
        return self.adapters.index(name)

    def add_adapter(self, name: str, files: PeftFiles, identity: str | None = None) -> int:
        """Load a PEFT LoRA (already read and checked) into the next slot; returns the slot.
        `identity` names its exact weights (e.g. their sha256s) for persistent caches."""
        if name in self.adapters:
            raise LoramuxError(f"adapter {name!r} is already loaded; unload it first")
        factors = lora_factors(files)
        # Refused here, not met mid-batch: the compiled step pads a row's picks of the batch's
        # adapter table with position 0 at weight 0 (engine/compiled.py), so a NaN factor there
        # would reach rows that do not mix that adapter (0 · NaN = NaN)
        broken = sorted(m for m, ab in factors.items() if not _finite(ab, module_scaling(files.config, m, ab["A"].shape[0])))
        if broken:
            shown = name.partition("\x00")[0]  # put_adapter stages a new version as name + "\x00staging"
            raise LoramuxError(f"adapter {shown!r} has non-finite (NaN or infinite) weights or scale in module(s) "
                               f"{broken[:3]}{'...' if len(broken) > 3 else ''}; retrain or re-export it")
        outside = sorted(m for m in factors if m not in self.layers)
        if outside:
            raise LoramuxError(
                f"adapter {name!r} adapts module(s) {outside[:3]}{'...' if len(outside) > 3 else ''} that this engine "
                f"does not fuse; its fused modules are {list(self.target_modules)} (build the engine with "
                f"target_modules covering them)")
        for module, layer in self.layers.items():
            ab = factors.get(module)
            if ab is None:
                layer.add_slot(None, None, 0.0)
                continue
            gate = (ab["gate_w"], ab["gate_b"]) if "gate_w" in ab else None
            layer.add_slot(ab["A"], ab["B"], module_scaling(files.config, module, ab["A"].shape[0]), gate)
        self.adapters.append(name)
        self.identities[name] = identity
        self.version += 1
        _return_freed_memory()
        return len(self.adapters) - 1

    def load(self, library: "Library", name: str) -> int:
        """Load a library adapter after the library's checks (files, sha256, base fingerprint)."""
        for attempt in range(3):  # another process may replace it between reading the manifest and its dir
            try:
                library.check_loadable(name, self.base)
                spec = library.get(name)
                files = read_peft_dir(library.path / "adapters" / spec.dir)
                break
            except (FileNotFoundError, LoramuxError):
                if attempt == 2 or name not in library:
                    raise
        return self.add_adapter(name, files, library_identity(spec))

    def put_adapter(self, name: str, files: PeftFiles, commit: "Callable[[], str | None] | None" = None) -> None:
        """Load `files` as adapter `name`, new or a new version of a loaded one, in its slot (the
        slot number stays). The new version is loaded beside the old one first, then `commit()`
        runs (e.g. the library write; it returns the identity); if either fails, the old version
        is still in place and nothing changed."""
        staging = f"{name}\x00staging"
        self.add_adapter(staging, files)
        try:
            identity = commit() if commit is not None else None
        except BaseException:
            self.remove_adapter(staging)
            raise
        names = list(self.adapters)  # readers on other threads see the old list or the new, never a shift
        if name in names:
            k = names.index(name)
            for layer in self.layers.values():
                layer.remove_slot(k)
                layer.move_slot(layer.num_slots - 1, k)  # the new version takes the old one's slot
            names.pop()  # the staging entry: the names are as before
        else:
            names[-1] = name
        self.adapters = names
        self.identities.pop(staging, None)
        self.identities[name] = identity
        self.version += 1
        _return_freed_memory()

    def remove_adapter(self, name: str) -> None:
        k = self.slot(name)
        for layer in self.layers.values():
            layer.remove_slot(k)
        self.adapters.pop(k)
        self.identities.pop(name, None)
        self.version += 1
        _return_freed_memory()

    # ------------------------------------------------------------------ mixtures
    def sequence_mixture(self, rows: list[dict[str, float]]) -> SequenceMixture:
        """Per-row {adapter name: weight} -> SequenceMixture (rows padded with zero weights)."""
        if not rows:
            raise LoramuxError("no rows given")
        width = max(len(r) for r in rows)
        indices, weights = [], []
        for i, row in enumerate(rows):
            if not row:
                raise LoramuxError(f"row {i}: empty mixture; name at least one adapter, e.g. {{'{(self.adapters or ['name'])[0]}': 1.0}}")
            for name, w in row.items():
                if not math.isfinite(w):
                    raise LoramuxError(f"row {i}: weight {w!r} for adapter {name!r} is not finite")
            slots = [self.slot(n) for n in row]
            pad = width - len(row)
            indices.append(slots + [slots[0]] * pad)  # zero-weight padding adds nothing
            weights.append(list(row.values()) + [0.0] * pad)
        return SequenceMixture(torch.tensor(indices), torch.tensor(weights, dtype=torch.float32))

    @contextlib.contextmanager
    def mixture(self, mix: Mixture | None, attention_mask: torch.Tensor | None = None,
                reference: bool = False, fold: bool = False) -> Iterator[None]:
        """Run the model's forwards inside this block with `mix` (None: the base model alone).

        `fold=True` folds a mixture that every row shares into the weights (see MultiLoraLinear).
        """
        keys = ("mixture", "attention_mask", "reference", "fold")
        saved = {k: getattr(self.state, k) for k in keys}
        for k, v in zip(keys, (mix, attention_mask, reference, fold)):
            setattr(self.state, k, v)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(self.state, k, v)

    def release(self) -> None:
        """Drop cached gathered and folded factors (frees the folded weight copies)."""
        for layer in self.layers.values():
            layer._cache = layer._folded = layer._union = layer._some = None

    def adapter_bytes(self) -> int:
        """Bytes held by the stacked adapter factors of all layers."""
        return sum(t.numel() * t.element_size() for layer in self.layers.values()
                   for t in (layer.lora_A, layer.lora_B, layer.scaling))


def _finite(factors: dict[str, torch.Tensor], scaling: float) -> bool:
    """Whether a module's factors are finite as the fused layers hold them (fp32, A times its
    scale: a huge lora_alpha overflows there even where A and alpha are finite)."""
    if not math.isfinite(scaling):
        return False
    A = factors["A"].float() * scaling
    return bool(torch.isfinite(A).all()) and all(bool(torch.isfinite(t.float()).all())
                                                 for k, t in factors.items() if k != "A")
