"""The FID of images against reference statistics, once or every N training steps.

    features = get_features("mnist-classifier")                # or "inception" (+ its weights)
    ref = reference(features, dataset="mnist")                  # stats.py: a file or a dataset
    fid = fid_of_samples(samples, features, ref)                 # samples [N, H, W, C] -> float
    periodic = PeriodicFID("mnist-classifier", "mnist", None, 28, (28, 28, 1))
    fid = periodic(samples)                                      # `--fid-every` of pretrain and finetune
"""

from __future__ import annotations

import numpy as np

from idiff_cli.fid.features import Features, embed_all, get_features
from idiff_cli.fid.frechet import feature_statistics, frechet_distance
from idiff_cli.fid.stats import Reference, reference


def fid_of_features(feats: np.ndarray, ref: Reference) -> float:
    """The Fréchet distance between the Gaussian of features [N, D] and the reference's."""
    return frechet_distance(*feature_statistics(feats), ref.mu, ref.sigma)


def fid_of_samples(images, features: str | Features = "mnist-classifier", ref_stats=None,
                   dataset: str = "mnist", batch: int = 250) -> float:
    """The FID of images [N, H, W, C] (float in [-1, 1] or uint8) against `ref_stats` (an .npz path, a
    (mu, sigma) pair or a `Reference`) or, without it, against all images of `dataset` (default: MNIST,
    the embedded digits offline). For an FID every N steps, `PeriodicFID` builds the extractor and the
    reference once."""
    features = get_features(features)
    if isinstance(ref_stats, Reference):
        ref = ref_stats
    elif isinstance(ref_stats, tuple):
        ref = Reference(*ref_stats, "given")
    else:
        ref = reference(features, ref_stats, dataset, batch=batch)
    return fid_of_features(embed_all(features, images, batch), ref)


class PeriodicFID:
    """FID of a fixed set of samples every N training steps (`--fid-every` of pretrain and finetune): the
    feature extractor and the reference statistics (all images of `dataset`, computed once per machine:
    stats.py) are built once; `fid(images [N, H, W, C])` -> float."""

    def __init__(self, features: str | Features, dataset: str, data_dir: str | None, image_size: int,
                 image_shape: tuple[int, ...]):
        self.features = get_features(features)
        self.features.check_shape((1, *image_shape))
        self.ref = reference(self.features, None, dataset, data_dir or None, image_size)
        self.label = self.features.label

    def __call__(self, images) -> float:
        return fid_of_features(embed_all(self.features, np.asarray(images)), self.ref)
