"""Pretraining data: the tfds path (tfds.data_source, here under tfds.testing.mock_data, no TensorFlow),
the offline fallback, clear errors, and a data order that a checkpoint position resumes exactly."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from idiff_cli.data import datasets
from idiff_cli.data.embedded import MNIST_SOURCE
from idiff_cli.data.stream import DataStream
from idiff_cli.errors import UserError


def test_tfds_datasets_through_data_source():
    with tfds.testing.mock_data(num_examples=40):
        mnist = datasets.load("mnist")
        assert mnist.source.startswith("tensorflow-datasets 'mnist'") and mnist.num_examples == 40
        images, labels = mnist.batch(np.array([3, 0, 7]))
        assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8 and labels.shape == (3,)
        cifar = datasets.load("cifar10")
        assert cifar.image_shape == (32, 32, 3) and cifar.num_classes == 10
        # LSUN images vary in size: centre-cropped and resized to --image-size (default 64).
        lsun = datasets.load("lsun-bedroom")
        assert lsun.image_shape == (64, 64, 3) and lsun.num_classes == 0
        assert lsun.batch(np.arange(3))[0].shape == (3, 64, 64, 3)
        assert datasets.load("lsun-bedroom", image_size=32).batch(np.arange(2))[0].shape == (2, 32, 32, 3)
        # Any tfds image dataset by name.
        assert datasets.load("fashion_mnist").image_shape == (28, 28, 1)


def test_missing_data_falls_back_for_mnist_only(tmp_path):
    mnist = datasets.load("mnist", data_dir=str(tmp_path))
    assert mnist.source.startswith(MNIST_SOURCE) and mnist.num_examples == 5000
    with pytest.raises(UserError, match="tfds build cifar10 --file_format=array_record --data_dir"):
        datasets.load("cifar10", data_dir=str(tmp_path))
    with pytest.raises(UserError, match="unknown dataset 'no-such-data'"):
        datasets.load("no-such-data")
    assert datasets.load("colored-mnist").image_shape == (28, 28, 3)
    assert mnist.source.endswith("tfds 'mnist' is not prepared")


def test_without_tensorflow_datasets_mnist_falls_back_and_the_others_say_so_in_one_line(monkeypatch):
    """An environment without the package: a sys.modules entry None makes its import raise ImportError
    (and importlib.util.find_spec return None)."""
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    mnist = datasets.load("mnist")
    assert mnist.source == f"{MNIST_SOURCE} — tensorflow-datasets is not installed" and mnist.num_examples == 5000
    with pytest.raises(UserError, match="dataset 'cifar10' needs tensorflow-datasets, .*; pip install tensorflow-datasets"):
        datasets.load("cifar10")


def test_center_crop_resize():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 10:50] = 200  # the centre 40×40 square
    out = datasets.center_crop_resize(image, 20)
    assert out.shape == (20, 20, 3) and out.min() == 200


def test_data_order_is_resumable_and_split_over_processes():
    ds = datasets.load("colored-mnist")
    stream = DataStream(ds, batch=32, seed=0)
    whole = stream.indices(0, 400)  # 400 batches: 2.56 epochs of the 5000 // 32 * 32 = 4992 per epoch
    np.testing.assert_array_equal(DataStream(ds, 32, 0).indices(32 * 150, 10), whole[150:160])
    first_epoch = whole[:156].reshape(-1)
    assert len(set(first_epoch)) == 4992  # each example at most once per epoch
    assert not np.array_equal(whole[:156], whole[156:312])  # a new permutation each epoch
    halves = [DataStream(ds, 32, 0, process_index=i, process_count=2).indices(0, 5) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), whole[:5])
    images, labels = stream.read(0, 2)
    assert images.shape == (2, 32, 28, 28, 3) and labels.shape == (2, 32)
