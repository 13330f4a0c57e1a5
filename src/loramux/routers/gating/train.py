"""Train MoLE gates: base and LoRAs frozen, only gates and τ learn, on the library's tasks mixed.

Loss = task loss (answer tokens) + α · L_balance, with L_balance = −Σ_i log q_i and q_i the mean
gate weight of adapter i over the prompts (MoLE, arXiv 2404.13628, takes it over all gated units
together; loramux by default per gated unit, see `balance_over` below). It is computed on
the live gate outputs, so its gradient reaches the gates; the public MoLE code detaches it, which
makes it a constant.

Over how many prompts q is taken matters once a library has more adapters than a batch has
prompts: a batch of 8 from 14 tasks cannot use all 14 adapters, so a per-batch −Σ log q_i
penalises the gates for routing at all (the adapters of the tasks absent from the batch get q ≈ 0)
and holds them near the uniform mixture. q is therefore a running mean over recent batches
(`balance_memory`; 0 = this batch alone, the paper's form), whose current batch carries the
gradient: the balance is asked of the traffic, not of every batch.

Over what q is taken matters too (`balance_over`). The paper pools every gated unit: q_i is one
mean over all layers. Pooled, the loss is met by gates that ignore the input: each layer near
one-hot on its own fixed adapter, layer 1 on adapter A whatever the prompt, layer 2 on B, and so
on; the pooled q is then near uniform (docs/routing.md, MoLE, shows gates trained this way). With
"units" (the default) the loss is the mean over units of each unit's own −Σ_i log q_i, so a
unit that always picks one adapter is penalised and balance can only come from routing
different inputs to different adapters (or from mixing evenly). "pooled" is the paper's form.

A routing term (`route_alpha`, loramux's addition; 0, the default, is the paper's objective): the
library knows which adapter was trained on each training example's task, so every unit's gate
can be asked to put its weight there, + β · mean over units of −log w_u[own adapter]. Trained on
the answer loss alone, 14-adapter gates picked near one-hot adapters per layer that mostly were
not the prompt's own (docs/routing.md, MoLE): the answer loss is met by many per-layer
combinations, and nothing in it prefers the one that generalises, the adapter trained for the
task. The term needs `owners` (task -> adapter).

A routing start (`route_init_per_task`, loramux's addition; 0, the default, starts from the uniform
mixture as the paper does): before the main loop, each unit's gate is fitted to the routing term
alone on that many prompts of each task (route_init.py says how and why). It needs `owners` too.

The gates pool over the prompt alone in training, as they do at inference (prefill); the answer
tokens of a training example are left out of the pool (`prompt_mask`).

Training runs until a validation curve flattens: a few held-out examples per task
(`val_per_task`) are scored every `eval_every` steps; after `patience` evaluations without a
relative improvement of `min_delta`, or at `steps`, training stops and the gates of the best
evaluation are kept. The curve is stored with the router (`info["curve"]`).

With `checkpoint_dir`, every evaluation writes a checkpoint (gates, the best gates so far, the
optimizer's moments, the running balance and the curve; safetensors and JSON, never a pickle),
and `resume=True` continues from it: the batch stream is a pure function of the step, so a
resumed run sees the batches it would have seen.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ...errors import LoramuxError
from .gates import MoleConfig, MoleGates, gated_modules, out_widths
from .route_init import ROUTE_FIT, route_init, sample_owned
from .router import MoleRouter

if TYPE_CHECKING:
    from ...data import Task
    from ...fusion import FusedModel


@dataclass(frozen=True)
class MoleTrainConfig:
    granularity: str = "layer"
    gate_input: str = "outputs"  # the paper's gating (gates.py)
    balance_alpha: float = 0.5  # α; 0 turns the balance loss off (the paper's ablation)
    balance_memory: float = 0.9  # q_i as a running mean over batches; 0: this batch alone
    balance_over: str = "units"  # "units": each gated unit balanced on its own; "pooled": the paper's
    route_alpha: float = 0.0  # β of the routing term (module docstring); 0: the paper's objective
    route_init_per_task: int = 0  # prompts per task the gates are first fitted to route (route_init.py); 0: none
    # each of those prompts rendered in these formats (routers/sentence/formats.py TRAIN_FORMATS), so
    # that the start routes the content, not only its task's template; ("own",): the template alone
    route_init_formats: tuple[str, ...] = ("own",)
    # The paper's gate projects K·d normalised features: an early Adam step moves each weight by
    # about lr, a logit by about lr·K·d·E|h| (≈ 0.6 at 1e-4 for 14 adapters of width 576), so
    # 1e-3 flips gates from uniform to one-hot within two steps.
    lr: float = 1e-4
    steps: int = 400  # at most; validation usually stops it earlier; 0 with a routing start: the start alone
    batch_size: int = 8
    max_seq_len: int = 256
    seed: int = 0
    val_per_task: int = 4  # held out from training; 0: no validation, run all `steps`
    eval_every: int = 20
    patience: int = 3  # evaluations without a relative improvement of min_delta
    min_delta: float = 0.005

    def __post_init__(self) -> None:
        MoleConfig(self.granularity, gate_input=self.gate_input)  # validates both
        if self.balance_alpha < 0:
            raise LoramuxError(f"balance_alpha must be >= 0; got {self.balance_alpha!r}")
        if self.route_alpha < 0:
            raise LoramuxError(f"route_alpha must be >= 0; got {self.route_alpha!r}")
        if self.route_init_per_task < 0:
            raise LoramuxError(f"route_init_per_task must be >= 0; got {self.route_init_per_task!r}")
        from ..sentence.formats import check_formats

        if isinstance(self.route_init_formats, str):
            raise LoramuxError(f"route_init_formats must be a sequence of format names, e.g. ('own', 'raw'); got "
                               f"the string {self.route_init_formats!r}")
        check_formats(tuple(self.route_init_formats))
        # a stored list reads back as a tuple; without a start the formats change nothing, so they are
        # not allowed to make two equal runs look like two recipes
        object.__setattr__(self, "route_init_formats",
                           tuple(self.route_init_formats) if self.route_init_per_task else ("own",))
        if self.balance_over not in BALANCE_OVER:
            raise LoramuxError(f"balance_over must be one of {', '.join(BALANCE_OVER)}; got {self.balance_over!r}")
        if not 0 <= self.balance_memory < 1:
            raise LoramuxError(f"balance_memory must be in [0, 1); got {self.balance_memory!r}")
        if self.batch_size < 1 or self.steps < (0 if self.route_init_per_task else 1):
            raise LoramuxError(f"batch_size must be positive, and steps too (0 only with route_init_per_task: the "
                               f"routing start alone); got steps={self.steps}, batch_size={self.batch_size}")
        if self.val_per_task < 0 or self.eval_every < 1 or self.patience < 1 or self.min_delta < 0:
            raise LoramuxError("val_per_task >= 0, eval_every >= 1, patience >= 1 and min_delta >= 0 are required")


BALANCE_OVER = ("units", "pooled")


def balance_loss(collected: list[torch.Tensor], memory: torch.Tensor | None = None,
                 keep: float = 0.0, over: str = "units") -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """−Σ_i log q_i. `over` "pooled": q_i = mean weight of adapter i over every gated unit and
    batch row (K,); "units": q is taken per unit over its batch rows (U, K) and the loss is the
    mean of the units' losses. With `memory` (the running q of earlier batches, either shape),
    q = keep·memory + (1 − keep)·q_batch and the new running q (detached) is returned too."""
    if over not in BALANCE_OVER:
        raise LoramuxError(f"balance_over must be one of {', '.join(BALANCE_OVER)}; got {over!r}")
    if over == "units":
        q = torch.stack([w.mean(0) for w in collected])  # (U, K)
    else:
        q = torch.cat(collected, dim=0).mean(0)  # (K,)
    if memory is None:
        return -torch.log(q.clamp(min=1e-9)).sum(-1).mean()
    q = keep * memory + (1 - keep) * q
    return -torch.log(q.clamp(min=1e-9)).sum(-1).mean(), q.detach()


def split_validation(tasks: list["Task"], per_task: int, seed: int):
    """(train examples, validation examples): `per_task` seeded examples of each task held out
    (none from a task with fewer than 2 * per_task examples)."""
    train, val = _split_labelled(tasks, per_task, seed)
    return [e for e, _ in train], [e for e, _ in val]


def _split_labelled(tasks: list["Task"], per_task: int, seed: int):
    """split_validation's two lists as (example, task name) pairs."""
    train, val = [], []
    for t in tasks:
        idx = list(range(len(t.examples)))
        held = set(random.Random(f"{seed}:{t.name}").sample(idx, per_task)) if len(idx) >= 2 * per_task else set()
        train += [(t.examples[i], t.name) for i in idx if i not in held]
        val += [(t.examples[i], t.name) for i in sorted(held)]
    return train, val


def task_owners(library) -> dict[str, str]:
    """Task -> the one adapter of `library` trained on it; a task that several adapters name has no
    single own adapter and is left out (the routing term skips its examples)."""
    names: dict[str, list[str]] = {}
    for spec in library.routable_specs():  # not the general adapter: it is never gated
        for t in spec.tasks:
            names.setdefault(t, []).append(spec.name)
    return {t: a[0] for t, a in names.items() if len(a) == 1}


def route_loss(collected: list[torch.Tensor], own: torch.Tensor) -> torch.Tensor:
    """Mean over units and rows of −log w_u[row, own[row]]; rows whose own is −1 (a task no
    gated adapter was trained on) are left out."""
    keep = own >= 0
    if not bool(keep.any()):
        return collected[0].new_zeros(())
    w = torch.stack(collected)[:, keep]  # (U, B', K)
    picked = w.gather(2, own[keep][None, :, None].expand(w.shape[0], -1, 1))
    return -torch.log(picked.clamp(min=1e-9)).mean()


def train_mole(fused: "FusedModel", tasks: list["Task"], config: MoleTrainConfig = MoleTrainConfig(), *,
               progress: bool = True, log: Callable[[str], None] = print,
               checkpoint_dir: str | Path | None = None, resume: bool = False,
               owners: dict[str, str] | None = None) -> MoleRouter:
    """`owners`: task name -> the adapter trained on it (`task_owners`). The routing term
    (route_alpha > 0) needs it; given, the validation curve also records `val_own_top_share`
    whatever route_alpha is."""
    from tqdm.auto import tqdm

    from ...data import PromptFormatter
    from ...training.batching import LazyFeatures, micro_batch_indices

    if not fused.adapters:
        raise LoramuxError("load the library's adapters into the fused model before training gates")
    base = fused.base
    routes = config.route_alpha or config.route_init_per_task
    if routes and not owners:
        raise LoramuxError("route_alpha > 0 or route_init_per_task > 0 needs owners: which adapter each task "
                           "was trained on")
    labelled, val_labelled = _split_labelled(tasks, config.val_per_task, config.seed)
    if not labelled:
        raise LoramuxError("no training examples for the gates")
    examples, val_examples = [e for e, _ in labelled], [e for e, _ in val_labelled]
    slot = {a: k for k, a in enumerate(fused.adapters)}
    own = [slot.get((owners or {}).get(t), -1) for _, t in labelled]
    val_own = [slot.get((owners or {}).get(t), -1) for _, t in val_labelled]
    if routes:
        if all(k < 0 for k in own):
            raise LoramuxError(f"routing asked for, but no training task has an owner among the loaded adapters "
                               f"{list(fused.adapters)}: owners maps {sorted(owners)}")
        if unowned := sorted({t for (_, t), k in zip(labelled, own) if k < 0}):
            log(f"mole: routing leaves out the examples of {unowned}: no single loaded adapter owns them")
    fmt = PromptFormatter(base.tokenizer)
    features = LazyFeatures(fmt, examples, config.max_seq_len)
    val_features = LazyFeatures(fmt, val_examples, config.max_seq_len)
    torch.manual_seed(config.seed)
    gated = list(fused.adapters)  # the modules these adapters adapt: the rule saving and loading use
    gates = MoleGates(gated_modules(fused, gated), len(fused.adapters), MoleConfig(config.granularity,
                                                                              gate_input=config.gate_input),
                      out_widths(fused, gated))
    device = next(base.model.parameters()).device
    gates.to(device)
    router = MoleRouter(fused, gates, list(fused.adapters))
    frozen = [p.requires_grad for p in base.model.parameters()]
    for p in base.model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(gates.parameters(), lr=config.lr)
    mixture = router.layer_mixture()
    # (K,); per unit it broadcasts to (U, K) at the first step
    memory = torch.full((len(fused.adapters),), 1.0 / len(fused.adapters), device=device)
    curve, window, best = [], [], None
    stopped = "steps"
    started = time.perf_counter()
    first, elapsed = 0, 0.0
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    # the config as a checkpoint stores it (tuples read back as lists)
    meta = {"config": json.loads(json.dumps(asdict(config))), "adapters": list(fused.adapters), "tasks": [t.name for t in tasks],
            "owners": dict(owners) if routes else None, "gate_pool": "prompt",
            "route_fit": ROUTE_FIT if config.route_init_per_task else None}
    resumed = bool(resume and ckpt and (ckpt / _STATE).is_file())
    start = None  # the routing start's gates (step 0), kept for calibrate_sharpen to weigh against the kept ones
    if ckpt and not resumed:
        (ckpt / _START).unlink(missing_ok=True)  # an earlier run's, in a directory this run starts afresh
    if resumed:
        first, elapsed, curve, best, memory, start = _load_checkpoint(ckpt, meta, gates, opt)
        log(f"mole: resuming at step {first} from {ckpt}")
        if config.route_init_per_task and start is None and val_features:
            log("mole: this checkpoint does not hold the routing start (written before it was kept); "
                "calibrate_sharpen will weigh the kept gates alone")
        if first % config.eval_every and first < config.steps:
            # written at an earlier cap between evaluations: a run with this cap never evaluated there
            raise CheckpointPastCap(f"the MoLE checkpoint in {str(ckpt)!r} was written at step {first}, an earlier "
                                    f"cap that is not a multiple of eval_every={config.eval_every}; it cannot go on "
                                    f"as a run with a cap of {config.steps}: run without resume")
        if best is not None and _flat(first, best[1], config):
            stopped, first = "flat", config.steps  # it had stopped on a flat curve: nothing left to train

    def validate(point: dict, snapshot: dict | None = None) -> None:
        """Score the gates on the validation examples at `point` of the curve; keep them when they are
        the best so far (as `snapshot`, a copy of their state already made, or a new copy), and write
        the checkpoint."""
        nonlocal best
        val, own_share = _validation_loss(router, fused, mixture, val_features, val_own, config.batch_size, device)
        point["val_task_loss"] = round(val, 4)
        if own_share is not None:
            point["val_own_top_share"] = round(own_share, 4)
        if best is None or val < best[0] * (1 - config.min_delta):
            best = (val, point["step"], snapshot if snapshot is not None else copy.deepcopy(gates.state_dict()))
        label = " (routing start)" if point["step"] == 0 else ""
        log(f"mole step {point['step']}{label}: validation task loss {val:.4f} (best {best[0]:.4f} at step {best[1]})")
        if ckpt:
            _save_checkpoint(ckpt, meta, point["step"], elapsed + time.perf_counter() - started, curve, best,
                             memory, gates, opt, start if point["step"] == 0 else None)

    try:
        if config.route_init_per_task and not resumed:
            from ..sentence.formats import render

            picked = sample_owned(labelled, own, config.route_init_per_task, config.seed)
            rows = [(i, f) for i in picked for f in config.route_init_formats]
            prompts = [fmt.encode_prompt(render(labelled[i][0], f))[-config.max_seq_len:] for i, f in rows]
            point = {"step": 0, "route_init": route_init(gates, fused, prompts, [own[i] for i, _ in rows],
                                                         batch_size=config.batch_size, log=log)}
            curve.append(point)
            if val_features:  # step 0 scores the fitted gates: a run that never beats them keeps them
                start = copy.deepcopy(gates.state_dict())
                validate(point, start)  # one copy serves as the start and as the first best
        bar = tqdm(range(first, config.steps), desc=f"train mole ({config.granularity})", unit="step",
                   disable=not progress, initial=first, total=config.steps)
        for step in bar:
            idx = micro_batch_indices(len(features), config.batch_size, step, config.seed)
            task, weights = _forward(router, fused, mixture, [features[i] for i in idx], device, grad=True)
            bal, memory = balance_loss(weights, memory, config.balance_memory, config.balance_over)
            loss = task + config.balance_alpha * bal if config.balance_alpha else task
            if config.route_alpha:
                routed = route_loss(weights, torch.tensor([own[i] for i in idx], device=device))
                loss = loss + config.route_alpha * routed
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            window.append((task.item(), bal.item(), routed.item() if config.route_alpha else None))
            bar.set_postfix(task=f"{window[-1][0]:.3f}", balance=f"{window[-1][1]:.3f}")
            if (step + 1) % config.eval_every and step + 1 != config.steps:
                continue
            point = {"step": step + 1, "train_task_loss": round(sum(w[0] for w in window) / len(window), 4),
                     "balance_loss": round(sum(w[1] for w in window) / len(window), 4)}
            if config.route_alpha:
                point["route_loss"] = round(sum(w[2] for w in window) / len(window), 4)
            curve.append(point)
            window = []
            if not val_features:
                continue
            validate(point)
            if _flat(step + 1, best[1], config):
                stopped = "flat"
                break
    finally:
        router.collected = None
        for p, f in zip(base.model.parameters(), frozen):
            p.requires_grad_(f)
    if best is not None:
        gates.load_state_dict(best[2])
    # in memory only (the router's save writes the kept gates): calibrate_sharpen weighs it sharpened
    router.start = start if best is not None and best[1] != 0 else None
    seconds = elapsed + time.perf_counter() - started
    gates.eval()
    steps_run = curve[-1]["step"] if curve else config.steps
    router.info = {"train_config": asdict(config), "seconds": round(seconds, 1), "gate_params": gates.n_params,
                   "examples": len(examples), "val_examples": len(val_examples), "tasks": [t.name for t in tasks],
                   "steps_run": steps_run, "stopped": stopped, "best_step": best[1] if best else steps_run,
                   "best_val_task_loss": round(best[0], 4) if best else None, "curve": curve,
                   "gate_pool": "prompt"}  # pooled as at inference (prompt_mask); earlier gates pooled the answer too
    log(f"mole: {steps_run} steps ({stopped}) in {seconds:.0f}s; {gates.n_params:,} gate parameters; kept step "
        f"{router.info['best_step']} (validation task loss {router.info['best_val_task_loss']})")
    return router


def _flat(step: int, best_step: int, config: MoleTrainConfig) -> bool:
    """Whether training stops at `step`: `patience` evaluations since the best one."""
    return (step - best_step) // config.eval_every >= config.patience


def _forward(router: MoleRouter, fused, mixture, rows, device, grad: bool):
    """(answer loss, the gate weights of every unit) for one batch of encoded examples."""
    from ...training.batching import answer_loss, collate_left

    inputs, labels = collate_left(rows, fused.base.tokenizer.pad_token_id)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    router.collected = []
    with torch.set_grad_enabled(grad), fused.mixture(mixture, attention_mask=prompt_mask(inputs["attention_mask"], rows)):
        logits = fused.base.model(**inputs, logits_to_keep=labels.shape[1] + 1).logits
        task = answer_loss(logits, labels.to(device))
    collected, router.collected = router.collected, None
    return task, collected


def prompt_mask(attention_mask: torch.Tensor, rows) -> torch.Tensor:
    """The attention mask of a left-padded training batch with each row's answer tokens (its last
    ones) left out: what the gates pool over. At inference they pool over the prompt alone (the
    prefill), so pooling the answer in training would fit the gates to inputs they never see."""
    from ...training.batching import IGNORE

    keep = attention_mask.clone()
    width = keep.shape[1]
    for i, (_, labels) in enumerate(rows):
        keep[i, width - sum(1 for t in labels if t != IGNORE):] = 0
    return keep


def _validation_loss(router, fused, mixture, features, own: list[int], batch_size: int,
                     device) -> tuple[float, float | None]:
    """(mean answer loss over the held-out examples, per-batch means weighted by batch size; the
    share of (example, unit) pairs whose largest gate weight is on the example's own adapter, None
    when no example's task has one)."""
    total, n, hits, counted = 0.0, 0, 0, 0
    for b in range(0, len(features), batch_size):
        rows = [features[i] for i in range(b, min(b + batch_size, len(features)))]
        task, weights = _forward(router, fused, mixture, rows, device, grad=False)
        total, n = total + task.item() * len(rows), n + len(rows)
        y = torch.tensor(own[b:b + len(rows)], device=device)
        if bool((y >= 0).any()):
            top = torch.stack(weights).argmax(-1)[:, y >= 0]  # (U, B')
            hits += int((top == y[y >= 0]).sum())
            counted += top.numel()
    return total / max(1, n), (hits / counted if counted else None)


_STATE = "state.json"
_START = "start.safetensors"


def _save_checkpoint(ckpt: Path, meta: dict, step: int, elapsed: float, curve: list, best, memory: torch.Tensor,
                     gates: MoleGates, opt: torch.optim.Optimizer, start: dict | None = None) -> None:
    """`start`: the routing start, given at step 0 alone (a fresh run) and written once beside the
    step files, which are rewritten at every evaluation."""
    from safetensors.torch import save_file

    from ..._atomic import atomic_write_json

    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {f"gates.{k}": v.detach().cpu().contiguous() for k, v in gates.state_dict().items()}
    tensors |= {f"best.{k}": v.detach().cpu().contiguous() for k, v in best[2].items()}
    if start is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in start.items()}, ckpt / _START)
    state = opt.state_dict()
    for pid, st in state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
    tensors["memory"] = memory.detach().cpu().contiguous()
    save_file(tensors, ckpt / f"mole-{step}.safetensors")
    # state.json last and atomically: it is what makes this checkpoint the current one
    atomic_write_json(ckpt / _STATE, {**meta, "step": step, "elapsed": elapsed, "curve": curve,
                                      "best": [best[0], best[1]], "param_groups": state["param_groups"]})
    for old in ckpt.glob("mole-*.safetensors"):
        if old.stem != f"mole-{step}":
            old.unlink()


class CheckpointOtherRecipe(LoramuxError):
    """A checkpoint of another recipe (settings, adapters or tasks): nothing of it can be resumed."""


class CheckpointPastCap(LoramuxError):
    """A checkpoint this run's step cap cannot continue; unlike one from another recipe, it is not
    to be discarded: its run got further than this one may."""


def _load_checkpoint(ckpt: Path, meta: dict, gates: MoleGates, opt: torch.optim.Optimizer):
    from safetensors.torch import load_file

    state = json.loads((ckpt / _STATE).read_text())
    # `steps` is only a cap: the learning rate is constant and the batches a pure function of the
    # step, so a run resumed under a higher cap is the run that had that cap from the start
    cap = meta["config"]["steps"]
    meta = {**meta, "config": {**meta["config"], "steps": None}}
    if isinstance(state.get("config"), dict):  # written before balance_over (trained pooled) or route_alpha
        state["config"] = {"balance_over": "pooled", "route_alpha": 0.0, "route_init_formats": ["own"],
                           **state["config"], "steps": None}
    if {k: state.get(k) for k in meta} != meta:
        diff = sorted(k for k in meta if k != "config" and state.get(k) != meta[k])
        diff += sorted(f"config.{k}" for k in meta["config"] if (state.get("config") or {}).get(k) != meta["config"][k])
        raise CheckpointOtherRecipe(f"cannot resume MoLE training from {str(ckpt)!r}: its {diff} differ from this "
                                    f"run's; rerun with the same settings, adapters and tasks, or without resume")
    if state["step"] > cap:
        raise CheckpointPastCap(f"the MoLE checkpoint in {str(ckpt)!r} is at step {state['step']}, past this run's "
                                f"cap of {cap} steps; raise steps or run without resume")
    flat = load_file(ckpt / f"mole-{state['step']}.safetensors")
    device = gates.log_tau.device
    gates.load_state_dict({k[6:]: v.to(device) for k, v in flat.items() if k.startswith("gates.")})
    best_state = {k[5:]: v.to(device) for k, v in flat.items() if k.startswith("best.")}
    start = ({k: v.to(device) for k, v in load_file(ckpt / _START).items()} if (ckpt / _START).is_file()
             else None)
    moments: dict[int, dict] = {}
    for key, v in flat.items():
        if key.startswith("opt."):
            pid, name = key[4:].split(".", 1)
            moments.setdefault(int(pid), {})[name] = v.to(device) if v.dim() else v
    opt.load_state_dict({"state": moments, "param_groups": state["param_groups"]})
    best = (state["best"][0], state["best"][1], best_state)
    return state["step"], state["elapsed"], state["curve"], best, flat["memory"].to(device), start
