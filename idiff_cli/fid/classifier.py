"""The MNIST classifier whose penultimate layer gives the offline "FID (MNIST classifier features)".

The practice for MNIST generative models (e.g. the "MNIST FID" of score-based and flow papers): the
Fréchet distance in the feature space of a small classifier trained on MNIST, since Inception
features of 28×28 digits mean little. Not comparable with Inception FID, and reported under its own
name. The network: conv 3×3 stride 2 (16) → ReLU → conv 3×3 stride 2 (32) → ReLU → dense 128 → ReLU
(the 128-d features) → dense 10. Trained with Adam on the first 4,000 of the embedded digits
(400 per class), evaluated on the other 1,000; deterministic for a given seed. Trained once and
cached (orbax) under $IDIFF_CACHE_DIR (default ~/.cache/idiff)/mnist-classifier; training takes
about 10 s on 2 idle CPU cores:

    python -m idiff_cli.fid.classifier        # (re)trains and caches it, prints the held-out accuracy
"""

from __future__ import annotations

import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from idiff_cli.checkpoint import Checkpointer
from idiff_cli.data.embedded import mnist_digits

FEATURE_DIM = 128
STEPS, BATCH, LEARNING_RATE, SEED = 600, 64, 2e-3, 0


class MnistClassifier(nn.Module):
    """images [B, 28, 28, 1] in [0, 1] -> (features [B, 128], logits [B, 10])."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))  # 14×14
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))  # 7×7
        features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
        return features, nn.Dense(10)(features)


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("IDIFF_CACHE_DIR", "~/.cache/idiff")).expanduser() / "mnist-classifier"


def split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) digits as float [0, 1] and labels: 400 + 100 of each class (the embedded
    digits come in blocks of 500 per class)."""
    images, labels = mnist_digits()
    held_out = (np.arange(len(images)) % 500) >= 400
    x = images.astype(np.float32) / 255.0
    return (x[~held_out], labels[~held_out]), (x[held_out], labels[held_out])


def train(steps: int = STEPS, seed: int = SEED) -> tuple[dict, float]:
    """Trains the classifier on the 4,000 training digits; returns (params, held-out accuracy)."""
    (x, y), (x_test, y_test) = split()
    model, optimizer = MnistClassifier(), optax.adam(LEARNING_RATE)
    key = jax.random.key(seed)
    params = model.init(key, x[:1])["params"]
    x, y = jnp.asarray(x), jnp.asarray(y)

    def loss(params, idx):
        _, logits = model.apply({"params": params}, x[idx])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

    @jax.jit
    def step(state, k):
        params, opt_state = state
        idx = jax.random.choice(jax.random.fold_in(key, k), x.shape[0], (BATCH,), replace=False)
        updates, opt_state = optimizer.update(jax.grad(loss)(params, idx), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # A host loop over one jitted step, not a lax.scan: XLA:CPU runs the gradients of these nn.Conv
    # ~14x slower inside a while loop (7 ms vs 95 ms per step measured here; the cause: diffusion/conv.py),
    # and nothing is read back per step.
    state = (params, optimizer.init(params))
    for k in range(steps):
        state = step(state, k)
    params = state[0]
    _, logits = jax.jit(model.apply)({"params": params}, x_test)
    return params, float((np.asarray(logits).argmax(-1) == y_test).mean())


def load_or_train(directory: pathlib.Path | None = None) -> tuple[dict, dict]:
    """The cached (params, meta) from `directory` (default: cache_dir()), training and caching them first
    if absent. meta: steps, seed, held-out accuracy."""
    checkpointer = Checkpointer(directory or cache_dir(), keep=1)
    try:
        template = MnistClassifier().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
        if checkpointer.latest_step() is None:
            params, accuracy = train()
            checkpointer.save(STEPS, params, meta={"seed": SEED, "held_out_accuracy": accuracy})
            checkpointer.wait()
        return checkpointer.restore(template)
    finally:
        checkpointer.close()


def features_fn(params: dict):
    """images [B, 28, 28, 1] in [0, 1] -> features [B, 128] (jitted)."""
    return jax.jit(lambda images: MnistClassifier().apply({"params": params}, images)[0])


if __name__ == "__main__":
    import shutil

    shutil.rmtree(cache_dir(), ignore_errors=True)
    _, meta = load_or_train()
    print(f"cached the MNIST classifier in {cache_dir()}: held-out accuracy {meta['held_out_accuracy']:.4f}")
