"""images.py: 8-bit quantisation as PNG readers see it, and the layout of grids and strips."""

import numpy as np
from PIL import Image

from idiff_cli.images import GUTTER, from_uint8, grid, save_grid, save_strip, to_uint8


def test_quantisation_rounds_clips_and_inverts():
    assert to_uint8(np.array([-1.5, -1.0, -0.999, 0.0, 0.999, 1.0, 3.0])).tolist() == [0, 0, 0, 128, 255, 255, 255]
    pixels = np.arange(256, dtype=np.uint8)
    assert to_uint8(pixels) is pixels  # uint8 passes unchanged
    np.testing.assert_array_equal(to_uint8(from_uint8(pixels)), pixels)
    assert from_uint8(pixels)[[0, -1]].tolist() == [-1.0, 1.0]


def test_grid_places_each_image_row_major_between_white_gutters(tmp_path):
    images = np.stack([np.full((3, 2, 1), v, np.uint8) for v in (10, 20, 30, 40, 50)])  # 5 images 3×2
    out = grid(images)  # ⌈√5⌉ = 3 columns, 2 rows
    assert out.shape == (2 * (3 + GUTTER) + GUTTER, 3 * (2 + GUTTER) + GUTTER, 1)
    for i, value in enumerate((10, 20, 30, 40, 50)):
        r, c = divmod(i, 3)
        top, left = GUTTER + r * (3 + GUTTER), GUTTER + c * (2 + GUTTER)
        assert (out[top:top + 3, left:left + 2] == value).all()
    assert out.sum() == 255 * out.size - sum((255 - v) * 6 for v in (10, 20, 30, 40, 50))  # the rest is white
    png = np.asarray(Image.open(save_grid(images, tmp_path / "g.png", upscale=2)))
    np.testing.assert_array_equal(png, out[..., 0].repeat(2, 0).repeat(2, 1))


def test_strip_is_one_row_per_entry(tmp_path):
    rows = [np.full((4, 3, 3, 3), -1.0), np.full((4, 3, 3, 3), 1.0)]  # two steps of 4 RGB images
    png = np.asarray(Image.open(save_strip(rows, tmp_path / "s.png", upscale=1)))
    assert png.shape == (2 * (3 + GUTTER) + GUTTER, 4 * (3 + GUTTER) + GUTTER, 3)
    assert (png[GUTTER:GUTTER + 3, GUTTER:GUTTER + 3] == 0).all()
    assert (png[2 * GUTTER + 3:2 * GUTTER + 6, GUTTER:GUTTER + 3] == 255).all()
