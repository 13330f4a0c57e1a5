"""DLP-LoRA: a frozen sentence encoder + MLP head routes each prompt to a top-p adapter mixture."""

from .encoder import BaseModelEncoder, HFEncoder, encode_cached, load_encoder
from .head import MlpHead
from .formats import FORMATS, HELD_OUT_FORMATS, TRAIN_FORMATS, render
from .router import Abstain, DlpConfig, DlpRouter, energy
from .train import DlpTrainConfig, labelled_prompts, train_dlp

__all__ = ["DlpRouter", "DlpConfig", "DlpTrainConfig", "train_dlp", "labelled_prompts", "MlpHead",
           "load_encoder", "encode_cached", "HFEncoder", "BaseModelEncoder", "Abstain", "energy", "FORMATS",
           "TRAIN_FORMATS", "HELD_OUT_FORMATS", "render"]
