"""Train one plain LoRA on one task (or a union of tasks) and hand it to the library.

AdamW with linear warm-up and cosine decay, gradient accumulation, loss on answer tokens only,
a deterministic seed, a progress bar with the running loss, and resumable checkpoints. The
checkpoint holds only safetensors + JSON (optimizer moments included), never a pickle.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .._atomic import atomic_write_json
from ..data import PromptFormatter, Task
from ..errors import LoramuxError
from ..library.spec import TrainingSummary
from .batching import LazyFeatures, answer_loss, collate_left, micro_batch_indices
from .config import LoraTrainConfig

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

    from ..models import BaseModel

STATE_FILE = "state.json"


@dataclass
class TrainResult:
    model: "PeftModel"  # the base model wrapped with the trained adapter (active)
    summary: TrainingSummary
    losses: list[float] = field(default_factory=list)


def _lr_lambda(config: LoraTrainConfig, start: int = 0):
    """Warmup then cosine; `start` offsets the scheduler's own count so a resumed run is on schedule."""

    def f(i: int) -> float:
        step = start + i
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


# ------------------------------------------------------------------------- checkpoints
def _save_checkpoint(ckpt: Path, model: "PeftModel", optimizer: "torch.optim.Optimizer", step: int,
                     losses: list[float], elapsed: float, config: LoraTrainConfig, data: str) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    opt = optimizer.state_dict()
    tensors = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"{pid}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
    save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()},
              ckpt / f"adapter-{step}.safetensors")
    save_file(tensors, ckpt / f"optimizer-{step}.safetensors")
    # state.json is written last and atomically: it is what makes this checkpoint the current one.
    atomic_write_json(ckpt / STATE_FILE, {
        "step": step, "losses": losses, "elapsed": elapsed, "config": config.to_dict(), "data": data,
        "param_groups": opt["param_groups"],
    })
    for old in ckpt.glob("*.safetensors"):
        if not old.stem.endswith(f"-{step}"):
            old.unlink()


def _load_checkpoint(ckpt: Path, model: "PeftModel", optimizer: "torch.optim.Optimizer",
                     config: LoraTrainConfig, data: str) -> tuple[int, list[float], float]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((ckpt / STATE_FILE).read_text())
    if state["config"] != config.to_dict() or state["data"] != data:
        diff = {k: (state["config"].get(k), v) for k, v in config.to_dict().items() if state["config"].get(k) != v}
        if state["data"] != data:
            diff["data"] = (state["data"], data)
        raise LoramuxError(f"cannot --resume from {str(ckpt)!r}: it was made with different settings "
                           f"(checkpoint vs now: {diff}); rerun with the same settings or without --resume")
    step = state["step"]
    set_peft_model_state_dict(model, load_file(ckpt / f"adapter-{step}.safetensors"))
    flat = load_file(ckpt / f"optimizer-{step}.safetensors")
    opt_state: dict[int, dict] = {}
    for key, v in flat.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return step, state["losses"], state["elapsed"]


# ------------------------------------------------------------------------- training
def train_lora(
    base: "BaseModel",
    tasks: list[Task] | Task,
    config: LoraTrainConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    adapter_name: str = "default",
) -> TrainResult:
    """Train a LoRA on the union of `tasks`' examples. Wraps `base.model` in place with PEFT.

    Call `result.model.unload()` afterwards to get the plain base model back.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    config = (config or LoraTrainConfig()).resolved(base)
    tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
    examples = [ex for t in tasks for ex in t.examples]
    if not examples:
        raise LoramuxError(f"no training examples in task(s) {[t.name for t in tasks]}")
    data = ",".join(f"{t.name}({len(t)})" for t in tasks)
    formatter = PromptFormatter(base.tokenizer)
    features = LazyFeatures(formatter, examples, config.max_seq_len)
    pad_id = base.tokenizer.pad_token_id

    linear_suffixes = {n.rsplit(".", 1)[-1] for n in base.linear_shapes()}
    missing = [m for m in config.target_modules if m not in linear_suffixes]
    if missing:
        kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in base.model.named_modules()}
        found = {m: kinds[m] for m in missing if m in kinds}  # e.g. embed_tokens: Embedding
        raise LoramuxError(f"--target-modules {missing} are not linear layers of {base.model_id!r}"
                           + (f" ({', '.join(f'{m} is an {k}' for m, k in found.items())}; loramux adapts nn.Linear only)"
                              if found else "") + f"; its linear layers are {sorted(linear_suffixes)}")

    torch.manual_seed(config.seed)  # LoRA A init is random: seed it
    lora_config = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=list(config.target_modules), use_rslora=config.use_rslora, task_type="CAUSAL_LM",
    )
    model = get_peft_model(base.model, lora_config, adapter_name=adapter_name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    step, losses, elapsed = 0, [], 0.0
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if resume and ckpt and (ckpt / STATE_FILE).is_file():
        step, losses, elapsed = _load_checkpoint(ckpt, model, optimizer, config, data)
    # The schedule is a pure function of the step, so a resumed run picks it up exactly (offsetting it
    # rather than stepping the scheduler forward, which torch warns about before any optimizer step).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, start=step))

    device = next(model.parameters()).device
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc=f"train {data}"[:60], disable=not progress, unit="step")
    while step < config.steps:
        torch.manual_seed(config.seed * 7919 + step)  # dropout: reproducible across resumes
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(config.grad_accum):
            idx = micro_batch_indices(len(features), config.batch_size, step * config.grad_accum + micro, config.seed)
            inputs, labels = collate_left([features[i] for i in idx], pad_id)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            logits = model(**inputs, logits_to_keep=labels.shape[1] + 1).logits  # (B, K, V)
            loss = answer_loss(logits, labels.to(device)) / config.grad_accum
            loss.backward()
            step_loss += loss.item()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        if ckpt and config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.steps):
            _save_checkpoint(ckpt, model, optimizer, step, losses, elapsed + time.perf_counter() - started, config, data)
    bar.close()
    model.eval()
    elapsed += time.perf_counter() - started
    tail = losses[-10:]
    summary = TrainingSummary(
        steps=config.steps,
        final_loss=round(sum(tail) / len(tail), 4) if tail else None,
        seconds=round(elapsed, 1),
        data=data,
        examples=len(examples),
        seed=config.seed,
        config=config.to_dict(),
    )
    return TrainResult(model=model, summary=summary, losses=losses)
