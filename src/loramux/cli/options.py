"""Options shared by every command that runs the model (a typer option object may be shared).
Kept apart from `common.py` so that importing them stays light: `loramux --help` loads no torch."""

from enum import Enum

import typer

from ..models import DEVICE_HELP, DTYPE_HELP, QUANTIZE_CHOICES, QUANTIZE_HELP

DEVICE = typer.Option("auto", "--device", help=DEVICE_HELP)
DTYPE = typer.Option("auto", "--dtype", help=DTYPE_HELP)
COMPILE = typer.Option(False, "--compile/--no-compile",
                       help="Decode through the compiled step (Llama, Mistral, Qwen2 families): the first batch "
                            "of each size compiles for a few minutes, later runs load the compiled code from "
                            "Inductor's cache. Arrow/MoLE routing decodes eagerly either way.")
Quantize = Enum("Quantize", {c: c for c in QUANTIZE_CHOICES}, type=str)  # typer checks the choice (exit 2)
QUANTIZE = typer.Option("none", "--quantize", help=QUANTIZE_HELP)
NO_ABSTAIN = typer.Option(False, "--no-abstain",
                          help="Route even where the out-of-library test would send the prompt to the base model "
                               "(DLP's stored test; for arrow and mole, the library's DLP test in front of them).")
