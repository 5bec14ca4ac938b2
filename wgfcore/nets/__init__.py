"""Networks: the ADM-style U-Net (score and projection networks) and small MLPs for toy data."""
from .mlp import MLP
from .unet import ATTENTION_BACKENDS, KERNEL_MODES, PRESETS, UNet

__all__ = ["UNet", "PRESETS", "ATTENTION_BACKENDS", "KERNEL_MODES", "MLP"]
