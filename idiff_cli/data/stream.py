"""Batches of an image dataset in a deterministic order that a checkpoint can resume exactly.

Epoch e is the seeded permutation rng((seed, e)) of the examples (its remainder after the last full
batch dropped); the position is the number of examples consumed, so `read(position, k)` is all a
resumed run needs (pretraining: position = step × batch). Each process reads its contiguous slice
of every global batch.
"""

from __future__ import annotations

import numpy as np

from idiff_cli.data.datasets import ImageDataset
from idiff_cli.errors import UserError


class DataStream:
    """`read(position, k)` -> this process's images [k, local batch, H, W, C] uint8 and labels [k, local batch]."""

    def __init__(self, ds: ImageDataset, batch: int, seed: int, process_index: int = 0, process_count: int = 1):
        if ds.num_examples < batch:
            raise UserError(f"dataset '{ds.name}' has {ds.num_examples} images, fewer than --batch {batch}")
        self.ds, self.batch, self.seed = ds, batch, seed
        self.per_epoch = (ds.num_examples // batch) * batch  # drop the remainder of each epoch
        self.local = batch // process_count
        self.offset = process_index * self.local
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.ds.num_examples))
        return self._perm[1]

    def indices(self, position: int, n_batches: int) -> np.ndarray:
        """This process's example indices [n_batches, local batch] from `position` on."""
        out = []
        for b in range(n_batches):
            p = position + b * self.batch
            start = p % self.per_epoch + self.offset
            out.append(self._permutation(p // self.per_epoch)[start: start + self.local])
        return np.stack(out)

    def read(self, position: int, n_batches: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.indices(position, n_batches)
        images, labels = self.ds.batch(idx.reshape(-1))
        return images.reshape(*idx.shape, *images.shape[1:]), labels.reshape(idx.shape)
