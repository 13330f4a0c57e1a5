"""Typed configuration of plain LoRA training; errors name the CLI flag."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import LoramuxError

# Every projection of a Llama-style block (attention and MLP): the LoRA placement that worked
# best in the QLoRA study (Dettmers et al. 2023, sec. 4) and what the fused engine expects.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraTrainConfig:
    rank: int = 8  # --rank: LoRA rank r
    alpha: float = 16.0  # --alpha: LoRA alpha; the update is scaled by alpha / r
    # --dropout: dropout on the LoRA input. Off by default: runs of ~60 steps do not overfit, and
    # PEFT's dropout path costs ~23% of a CPU training step (14.0 vs 10.8 s; cpu_profile.json).
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=LLAMA_TARGETS)  # --target-modules; ("auto",): every projection
    use_rslora: bool = False  # --rslora: scale by alpha / sqrt(r) instead
    steps: int = 60  # --steps: optimizer steps
    batch_size: int = 8  # --batch-size: examples per micro-batch
    grad_accum: int = 1  # --grad-accum: micro-batches per optimizer step
    lr: float = 5e-4  # --lr: peak learning rate (AdamW)
    warmup_steps: int = 6  # --warmup-steps: linear warm-up, then cosine decay to 0
    weight_decay: float = 0.0  # --weight-decay
    max_grad_norm: float = 1.0  # --max-grad-norm: gradient clipping (0 = off)
    max_seq_len: int = 256  # --max-seq-len: longer examples lose the start of the prompt
    seed: int = 0  # --seed: data order, LoRA init and dropout
    checkpoint_every: int = 20  # --checkpoint-every: steps between resumable checkpoints (0 = never)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        positive = {"--rank": self.rank, "--steps": self.steps, "--batch-size": self.batch_size,
                    "--grad-accum": self.grad_accum, "--max-seq-len": self.max_seq_len}
        for flag, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise LoramuxError(f"{flag} must be a positive integer; got {value!r}")
        if not self.lr > 0:
            raise LoramuxError(f"--lr must be > 0; got {self.lr!r}")
        if not 0 <= self.dropout < 1:
            raise LoramuxError(f"--dropout must be in [0, 1); got {self.dropout!r}")
        if self.alpha <= 0:
            raise LoramuxError(f"--alpha must be > 0; got {self.alpha!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise LoramuxError(f"--warmup-steps must be in [0, --steps={self.steps}]; got {self.warmup_steps!r}")
        if self.checkpoint_every < 0:
            raise LoramuxError(f"--checkpoint-every must be >= 0; got {self.checkpoint_every!r}")
        if not self.target_modules:
            raise LoramuxError("--target-modules must name at least one module, e.g. q_proj,v_proj")

    def resolved(self, base) -> "LoraTrainConfig":
        """This config with `target_modules=("auto",)` replaced by every projection of the base
        model's blocks, whatever its family calls them (BaseModel.projection_names)."""
        import dataclasses

        if self.target_modules != ("auto",):
            return self
        return dataclasses.replace(self, target_modules=base.projection_names())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d
