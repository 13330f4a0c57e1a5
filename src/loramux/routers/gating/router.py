"""MoleRouter: applies trained MoLE gates through the fused layer's per-layer weights.

Hierarchical control at inference: `mask` names adapters to switch off; their logits become
-inf, so the softmax renormalises the remaining weights without retraining.

`sharpen` multiplies the gate logits before the softmax (1: the trained gates as they are). Gates
trained with the paper's objective stay soft, spreading weight over adapters that each fit only
their own task; a factor chosen on the held-out validation examples (calibrate.py), stored with
the gates, makes the weights more decisive without retraining.

In generation the weights are computed from the prompt at prefill and kept for the tokens that
follow (a one-token decode step has nothing to pool), row by row as rows finish.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
import contextlib
from typing import TYPE_CHECKING, Iterator

import torch

from ...errors import LoramuxError
from ..layerwise import InForwardRouter, per_row_routings, prefill, prompt_batch
from ..routing import Routing
from .gates import MoleConfig, MoleGates, gated_modules, out_widths

if TYPE_CHECKING:
    from ...fusion import FusedModel
    from ...library import Library

KIND = "mole"
CONFIG_FILE = "router.json"
WEIGHTS_FILE = "router.safetensors"


class _Recorder:
    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self.units: dict[str, torch.Tensor] = {}  # unit -> (B, K) weights of the prefill


class MoleRouter(InForwardRouter):
    kind = KIND
    granularity = "layer"

    def __init__(self, fused: "FusedModel", gates: MoleGates, adapters: list[str], *, mask: tuple[str, ...] = (),
                 info: dict | None = None):
        missing = [a for a in adapters if a not in fused.adapters]
        if missing:
            raise LoramuxError(f"the gates were trained for adapters {list(adapters)}; {missing} are not loaded in the "
                               f"fused model (it has {list(fused.adapters)})")
        self._slots: torch.Tensor | None = None
        self._gated: tuple[int, ...] | None = None
        self._slots_for = -1  # the fused model's version the slot index was read at
        unknown = sorted(set(mask) - set(adapters))
        if unknown:
            raise LoramuxError(f"cannot mask {unknown}: not among the gated adapters {list(adapters)}")
        if len(set(mask)) >= len(adapters):
            raise LoramuxError(f"masking {sorted(set(mask))} leaves no adapter; keep at least one of {list(adapters)}")
        self.fused, self.gates, self.adapters = fused, gates, list(adapters)
        self.mask = tuple(mask)
        self._off = torch.tensor([a in set(mask) for a in adapters])
        self._any_off = bool(mask)  # known on the host: no device sync per gate
        self.info = dict(info or {})
        self._stored: str | None = None  # set when loaded from stored weights: what they are, and the mask
        self.sharpen = self.info.get("sharpen", 1.0)
        self.collected: list[torch.Tensor] | None = None  # training: every unit's weights, for the balance loss
        # train_mole's routing start (a state dict) when it kept later gates, for calibrate.py; not saved
        # with the gates (save), though train_mole's checkpoints hold it
        self.start: dict[str, torch.Tensor] | None = None
        self._current: dict[str, torch.Tensor] = {}
        self._frozen: dict[str, torch.Tensor] | None = None

    @property
    def sharpen(self) -> float:
        """Gate logits x this before the softmax; kept in `info`, so saving the gates stores it."""
        return self._sharpen

    @sharpen.setter
    def sharpen(self, factor: float) -> None:
        if isinstance(factor, bool) or not (isinstance(factor, (int, float)) and 0 < factor < float("inf")):
            raise LoramuxError(f"sharpen must be a finite number > 0; got {factor!r}")
        self._sharpen = float(factor)
        if factor != 1.0 or "sharpen" in self.info:
            self.info["sharpen"] = self._sharpen

    @property
    def cache_key(self) -> str | None:
        """What the predictions of these gates depend on, for the prediction cache (None: gates
        not loaded from storage, which have no identity)."""
        if self._stored is None:
            return None
        return self._stored + (f"|sharpen={self._sharpen}" if self._sharpen != 1.0 else "")

    # ------------------------------------------------------------------ the gate
    def weights(self, unit: str, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        logits = self.gates.logits(unit, x, attention_mask, self.fused.layers[self.gates.anchor[unit]], self.slots())
        if self.sharpen != 1.0:
            logits = logits * self.sharpen
        if self._any_off:
            if self._off.device != logits.device:
                self._off = self._off.to(logits.device)
            logits = logits.masked_fill(self._off, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def gate(self, name: str, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        unit = self.gates.unit.get(name)
        if unit is None:  # a module only an adapter outside the gates (the general one) adapts
            return x.new_zeros(x.shape[0], len(self.fused.adapters))
        if self._frozen is not None and self._recorder is None:  # decode: the prompt's weights
            return self._frozen[unit].to(x.dtype)
        if self.gates.anchor[unit] == name:  # first module of the unit in this forward
            w = self.weights(unit, x, attention_mask)
            self._current[unit] = w
            if self.collected is not None:
                self.collected.append(w)
            if self._recorder is not None:
                self._recorder.units[unit] = w.detach()
        return self._to_slots(self._current[unit]).to(x.dtype)

    def slots(self) -> torch.Tensor | None:
        """Each gated adapter's fused slot; None when the fused model holds exactly the gated
        adapters, in order. Other loaded adapters (the library's general one) get weight 0 from the
        gates: their slots are filled in after the softmax, which sees the gated adapters alone.
        Read again whenever adapters were loaded or unloaded since."""
        if self._slots_for != self.fused.version:
            loaded = list(self.fused.adapters)
            missing = [a for a in self.adapters if a not in loaded]
            if missing:
                raise LoramuxError(f"the gates' adapters {missing} were unloaded from the fused model")
            gated = [loaded.index(a) for a in self.adapters]
            self._slots = None if loaded == self.adapters else torch.tensor(gated)
            self._gated = None if loaded == self.adapters else tuple(gated)  # on the host: gated_slots
            self._slots_for = self.fused.version
        return self._slots

    def gated_slots(self) -> tuple[int, ...] | None:
        """The fused layers compute only the gated adapters' slots (the others get weight 0)."""
        self.slots()  # brought up to date with the loaded adapters
        return self._gated

    def _to_slots(self, w: torch.Tensor) -> torch.Tensor:
        """(B, K gated) weights -> (B, fused slots): 0 for loaded adapters the gates do not cover."""
        slots = self.slots()
        if slots is None:
            return w
        if slots.device != w.device:
            slots = self._slots = slots.to(w.device)
        return w.new_zeros((*w.shape[:-1], len(self.fused.adapters))).index_copy(-1, slots, w)

    # ------------------------------------------------------------------ engine protocol
    def new_recorder(self, attention_mask: torch.Tensor) -> _Recorder:
        return _Recorder(attention_mask)

    def recorded(self, recorder: _Recorder) -> None:
        # the decode steps reuse the prompt's weights, spread over the fused slots once, not per step
        self._frozen = {u: self._to_slots(w) for u, w in recorder.units.items()}

    @contextlib.contextmanager
    def prefill_context(self, attention_mask: torch.Tensor) -> Iterator[None]:
        """Around a prompt forward inside an active mixture: pool over real tokens, keep the
        weights for the forwards that continue those prompts (scoring's cached choices)."""
        with self.recording(attention_mask), self.fused.mixture(self.layer_mixture(), attention_mask=attention_mask):
            yield

    def select_rows(self, keep: list[int]) -> None:
        """Rows that finished leave the batch: keep the frozen weights of the others."""
        if self._frozen is not None:
            self._frozen = {u: w[keep] for u, w in self._frozen.items()}

    def release(self) -> None:
        self._frozen = None
        self._current = {}

    def routings(self, recorder: _Recorder) -> list[Routing]:
        masked = f"; masked {list(self.mask)}" if self.mask else ""
        return per_row_routings(recorder.units, self.adapters, router=self.kind, granularity="layer",
                                reason=f"{self.gates.config.granularity}-wise gates, mean over "
                                       f"{len(recorder.units)} units{masked}")

    def route_weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unit -> (B, K) gate weights for a batch of token ids (one forward)."""
        return prefill(self, self.fused, input_ids, attention_mask).units

    def route(self, prompts: list[str]) -> list[Routing]:
        """Run the prompts once and report each one's gate weights (mean and per unit)."""
        ids, mask = prompt_batch(self.fused, prompts)
        return self.routings(prefill(self, self.fused, ids, mask))

    # ------------------------------------------------------------------ storage
    def save(self, library: "Library", name: str = KIND) -> Path:
        from safetensors.torch import save_file

        def write(d: Path) -> None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.gates.state_dict().items()},
                      str(d / WEIGHTS_FILE), metadata={"format": "pt", "kind": self.kind})
            (d / CONFIG_FILE).write_text(json.dumps({
                "kind": self.kind, "adapters": self.adapters, "gates": asdict(self.gates.config),
                "modules": gated_modules(self.fused, self.adapters),
                "info": self.info}, indent=2, sort_keys=True) + "\n")

        return library.save_router(name, self.kind, self.adapters, write)

    @classmethod
    def load(cls, library: "Library", fused: "FusedModel", name: str = KIND, *, mask: tuple[str, ...] = ()) -> "MoleRouter":
        """Load stored gates; loads their adapters into `fused` (in their order) when none are loaded."""
        from safetensors.torch import load_file

        d = library.router_dir(name)  # refuses a library whose adapters changed
        meta = json.loads((d / CONFIG_FILE).read_text())
        if meta.get("kind") != cls.kind:
            raise LoramuxError(f"router {name!r} is a {meta.get('kind')!r} router, not {cls.kind!r}")
        if not fused.adapters:  # the gated adapters, and the general one that serves abstained prompts
            for a in [*meta["adapters"], *([library.general] if library.general else [])]:
                fused.load(library, a)
        missing = [a for a in meta["adapters"] if a not in fused.adapters]
        if missing:
            raise LoramuxError(f"router {name!r} gates adapters {missing} that are not loaded in the fused model "
                               f"(it has {list(fused.adapters)})")
        modules = gated_modules(fused, meta["adapters"])
        if modules != meta["modules"]:
            raise LoramuxError(f"router {name!r} was trained for other fused modules than this model's")
        # routers stored before the paper's gating read their input: no gate_input in their config
        gates = MoleGates(modules, len(meta["adapters"]), MoleConfig(**{"gate_input": "input", **meta["gates"]}),
                          out_widths(fused, meta["adapters"]))
        gates.load_state_dict(load_file(str(d / WEIGHTS_FILE)))
        gates.to(next(fused.base.model.parameters()).device)  # beside the hidden states they read
        router = cls(fused, gates.eval(), meta["adapters"], mask=mask, info=meta.get("info"))
        digest = hashlib.sha256((d / WEIGHTS_FILE).read_bytes()).hexdigest()
        router._stored = f"mole|{digest}|{meta['adapters']}|mask={sorted(set(mask))}"
        return router
