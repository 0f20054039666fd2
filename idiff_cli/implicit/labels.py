"""Does the digit stay the digit? `label_kept`: the fraction of fixed-key samples whose MNIST label
under the current θ equals their label under θ0.

The paper's claim for Figs 13-14 is that reward training changes the digits' style (brighter,
thicker) "while retaining overall semantic information". With the noise keys fixed, sample i under
θ_k and sample i under θ0 start from the same x_{t_max} and see the same noise, so a finetuned model
that keeps the semantics keeps most labels. The labels come from `classifiers.LABELS` (seed 1, trained
on the last 100 embedded digits of each class, disjoint from the FID network's), not from the network
of the MNIST FID and digit:N, and no reward reads it, so the number cannot be raised by the reward
itself. θ0's labels are computed once and
kept in the run directory (labels/step_000000.npy), so a resumed run compares with the same ones.
Colour images are averaged over their channels, as for the FID features.
"""

from __future__ import annotations

import io
import pathlib
from typing import Any, Callable

import jax
import numpy as np

from idiff_cli import classifiers, loop, storage
from idiff_cli.fid.features import to_unit_range
from idiff_cli.runs import atomic_path

REFERENCE = pathlib.Path("labels") / "step_000000.npy"


def make_labeller(directory: pathlib.Path | None = None) -> Callable[[Any], np.ndarray]:
    """images [N, 28, 28, C] (float in [-1, 1] or uint8) -> digits [N] (int) from classifiers.LABELS
    (cached in `directory`, default its cache dir; trained there on first use). Images are quantised to
    8 bits as a saved PNG is, and averaged over colour channels."""
    params, _ = classifiers.load_or_train(directory, classifiers.LABELS)
    predict = classifiers.labels_fn(params)

    def labels(images) -> np.ndarray:
        x = to_unit_range(np.asarray(images))
        return np.asarray(predict(x.mean(axis=-1, keepdims=True)))

    return labels


def label_kept_hook(sample: Callable[[Any], jax.Array], params0: Any, every: int, run_dir: pathlib.Path,
                    labeller: Callable[[Any], np.ndarray] | None = None) -> loop.Hook:
    """A loop hook logging {"label_kept": fraction} every `every` steps (and at the end).

    sample:  θ -> images [n, 28, 28, C] from noise keys fixed for the whole run (n ≥ 256 for a
             standard error of the fraction ≤ 0.03), e.g. a finetune.make_grid_sampler with its frozen weights bound.
    params0: θ0, whose labels are the reference (computed at the first call unless run_dir holds them).
    The hook reads the state's θ as `state.params`."""
    labeller = labeller or make_labeller()
    path = storage.path(run_dir) / REFERENCE
    reference: list[np.ndarray] = []

    def kept(state: Any, step: int) -> dict:
        del step
        if not reference:
            if not path.exists():
                with atomic_path(path) as tmp:
                    np.save(tmp, labeller(sample(params0)))
            reference.append(np.load(io.BytesIO(path.read_bytes())))
        return {"label_kept": float(np.mean(labeller(sample(state.params)) == reference[0]))}

    return loop.Hook(every, kept)
