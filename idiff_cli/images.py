"""Images as files: 8-bit quantisation, the square sample grid and the strip of rows (PNG).

Images in the models live in [-1, 1] as float [n, H, W, C] (C = 1 or 3); on disk they are uint8, as
the standard tools (pytorch-fid, PIL) read PNG files: x ↦ round((x + 1) · 127.5), clipped to [0, 255].
"""

from __future__ import annotations

import math
import pathlib
from typing import Sequence

import numpy as np

from idiff_cli import storage
from idiff_cli.runs import atomic_path

GUTTER = 2  # white pixels between images


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] -> uint8 (round((x + 1) · 127.5), clipped); uint8 images pass unchanged."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(pixels):
    """uint8 images (numpy or jax) -> float32 in [-1, 1]: x / 127.5 − 1, the inverse of `to_uint8` on its grid."""
    return pixels.astype(np.float32) / 127.5 - 1.0


def grid(images, cols: int | None = None) -> np.ndarray:
    """uint8 [rows·(H+2)+2, cols·(W+2)+2, C]: `images` [n, H, W, C] row-major on white, 2-pixel gutters;
    `cols` defaults to ⌈√n⌉ (a square grid)."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + GUTTER) + GUTTER, cols * (w + GUTTER) + GUTTER, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = GUTTER + r * (h + GUTTER), GUTTER + col * (w + GUTTER)
        out[top: top + h, left: left + w] = pixels[i]
    return out


def save_png(pixels: np.ndarray, path: str | pathlib.Path, upscale: int = 2) -> pathlib.Path:
    """uint8 [H, W, C] as a PNG enlarged `upscale`× (nearest neighbour), written atomically."""
    from PIL import Image

    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    path = storage.path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def save_grid(images, path: str | pathlib.Path, upscale: int = 2) -> pathlib.Path:
    """Images [n, H, W, C] (in [-1, 1] or uint8) as a square PNG grid."""
    return save_png(grid(images), path, upscale)


def save_strip(rows: Sequence, path: str | pathlib.Path, upscale: int = 2) -> pathlib.Path:
    """One PNG row per entry of `rows` (each images [n, H, W, C], in [-1, 1] or uint8, the same n),
    stacked top to bottom: e.g. the same-seed samples at successive training steps."""
    return save_png(grid(np.concatenate([to_uint8(r) for r in rows]), cols=len(rows[0])), path, upscale)
