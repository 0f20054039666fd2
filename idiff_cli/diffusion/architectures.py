"""The U-Net of each preset for an image size (JAX-free: the pretrain options derive their defaults
from it before JAX starts). `BY_PRESET[preset](image_size)` -> the fields of `unet.UNet`.
"""

from __future__ import annotations

from typing import Any

# The U-Net fields an architecture sets.
FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "groups")


def paper_architecture(image_size: int) -> dict[str, Any]:
    """The usual DDPM-size networks: Ho et al.'s CIFAR-10 (35.7 M parameters) at 32×32 and their
    LSUN model at 256×256; a smaller one at 28×28 (MNIST); 64×64 in between."""
    if image_size <= 28:
        return dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,), dropout=0.1, groups=32)
    if image_size <= 32:
        return dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, groups=32)
    if image_size <= 64:
        return dict(ch=128, ch_mult=(1, 2, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, groups=32)
    return dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, groups=32)


def cpu_architecture(image_size: int) -> dict[str, Any]:
    """≈ 1 M parameters at 28×28 (0.97 M), sized for two CPU cores (its training time: docs/results.md).
    Few channels at full resolution, where a conv costs the most FLOPs per parameter, and 64 below:
    16×(1, 4, 4) takes fewer FLOPs per step than 32×(1, 2, 2) (1.11 M), with as good samples per step."""
    levels = (1, 4, 4) if image_size <= 32 else (1, 4, 4, 4)
    lowest = image_size // 2 ** (len(levels) - 1)
    return dict(ch=16, ch_mult=levels, num_res_blocks=1, attn_resolutions=(lowest,), dropout=0.0, groups=8)


BY_PRESET = {"paper": paper_architecture, "cpu": cpu_architecture}
