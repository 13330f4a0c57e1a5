"""DLP-LoRA: a frozen sentence encoder + MLP head routes each prompt to a top-p adapter mixture."""

from .encoder import BaseModelEncoder, HFEncoder, encode_cached, load_encoder
from .head import MlpHead
from .router import DlpConfig, DlpRouter
from .train import DlpTrainConfig, labelled_prompts, train_dlp

__all__ = ["DlpRouter", "DlpConfig", "DlpTrainConfig", "train_dlp", "labelled_prompts", "MlpHead",
           "load_encoder", "encode_cached", "HFEncoder", "BaseModelEncoder"]
