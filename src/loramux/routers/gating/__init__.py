"""MoLE: learned per-layer/block/network gates over frozen LoRAs, with a balance loss and masking."""

from .gates import GATE_INPUTS, GRANULARITIES, MoleConfig, MoleGates, gated_modules, out_widths, unit_of
from .calibrate import calibrate_sharpen
from .router import MoleRouter
from .train import CheckpointOtherRecipe, CheckpointPastCap, MoleTrainConfig, balance_loss, split_validation, task_owners, train_mole

__all__ = ["MoleRouter", "calibrate_sharpen", "MoleGates", "MoleConfig", "MoleTrainConfig", "train_mole", "balance_loss", "unit_of",
           "gated_modules", "out_widths", "split_validation", "task_owners", "CheckpointOtherRecipe", "CheckpointPastCap", "GRANULARITIES",
           "GATE_INPUTS"]
