"""The MNIST classifiers: one whose penultimate layer gives the offline "FID (MNIST classifier
features)" (fid/features.py) and whose class probabilities are the reward digit:N, and a second,
independent one that labels samples for finetune's `label_kept`.

The practice for MNIST generative models (e.g. the "MNIST FID" of score-based and flow papers): the
Fréchet distance in the feature space of a small classifier trained on MNIST, since Inception
features of 28×28 digits mean little. Not comparable with Inception FID, and reported under its own
name. The network: conv 3×3 stride 2 (16) → ReLU → conv 3×3 stride 2 (32) → ReLU → dense 128 → ReLU
(the 128-d features) → dense 10, trained with Adam; deterministic for a given seed and split.

* FID: seed 0, trained on the first 400 of each class's 500 embedded digits, evaluated on the other 100.
* LABELS (implicit/labels.py): seed 1, trained on the last 100 of each class (positions 400..499),
  evaluated on the first 400 (held-out accuracy 0.909: a tenth of the digits). Another initialisation
  and digits disjoint from the FID network's, so a sample's label does not come from the network whose
  features the FID uses, nor from one that saw its training digits. The reward digit:N reads the FID's
  network (implicit/rewards.py); no reward reads LABELS, so label_kept is judged by a network that no
  finetuning optimises against, directly or through shared training data.

Each is trained once, on first use, and cached (orbax) under $IDIFF_CACHE_DIR (default
~/.cache/idiff)/<name>:

    python -m idiff_cli.classifiers        # (re)trains and caches both, prints the held-out accuracies
"""

from __future__ import annotations

import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from idiff_cli.checkpoint import Checkpointer
from idiff_cli.data.embedded import mnist_digits
from idiff_cli.runs import cache_root, taking_turns

FEATURE_DIM = 128
STEPS, BATCH, LEARNING_RATE = 600, 64, 2e-3
PER_CLASS = 500  # the embedded digits come in blocks of 500 per class


@dataclasses.dataclass(frozen=True)
class Spec:
    """One classifier: its cache name, initialisation seed, and the positions [start, stop) within each
    class's block of 500 embedded digits that it trains on (the rest are its held-out digits)."""

    name: str
    seed: int
    train: tuple[int, int]


FID = Spec("mnist-classifier", 0, (0, 400))
LABELS = Spec("mnist-labels-400-499", 1, (400, 500))  # cached under its own name: no older copy is read


class MnistClassifier(nn.Module):
    """images [B, 28, 28, 1] in [0, 1] -> (features [B, 128], logits [B, 10])."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))  # 14×14
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))  # 7×7
        features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
        return features, nn.Dense(10)(features)


def cache_dir(spec: Spec = FID) -> pathlib.Path:
    return cache_root() / spec.name


def split(spec: Spec = FID) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) digits of `spec` as float [0, 1] and labels."""
    images, labels = mnist_digits()
    position = np.arange(len(images)) % PER_CLASS
    trained = (position >= spec.train[0]) & (position < spec.train[1])
    x = images.astype(np.float32) / 255.0
    return (x[trained], labels[trained]), (x[~trained], labels[~trained])


def train(spec: Spec = FID, steps: int = STEPS) -> tuple[dict, float]:
    """Trains the classifier `spec` on its training digits; returns (params, held-out accuracy)."""
    (x, y), (x_test, y_test) = split(spec)
    model, optimizer = MnistClassifier(), optax.adam(LEARNING_RATE)
    key = jax.random.key(spec.seed)
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
    # far slower inside a while loop (the cause: diffusion/conv.py), and nothing is read back per step.
    state = (params, optimizer.init(params))
    for k in range(steps):
        state = step(state, k)
    params = state[0]
    _, logits = jax.jit(model.apply)({"params": params}, x_test)
    return params, float((np.asarray(logits).argmax(-1) == y_test).mean())


def load_or_train(directory: pathlib.Path | None = None, spec: Spec = FID) -> tuple[dict, dict]:
    """The cached (params, meta) of classifier `spec` from `directory` (default: cache_dir(spec)),
    training and caching them first when no intact copy is there (a copy without its manifest, e.g.
    cut short, is set aside). Processes that need it at once take turns: one trains, the others read
    its copy. meta: seed, train positions, held-out accuracy."""
    directory = directory or cache_dir(spec)
    with taking_turns(directory.parent / f"{directory.name}.lock"):
        return _load_or_train(Checkpointer(directory, keep=1), spec)


def _load_or_train(checkpointer: Checkpointer, spec: Spec) -> tuple[dict, dict]:
    try:
        template = MnistClassifier().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
        found = checkpointer.restore_latest(lambda: template)
        if found is not None:
            return found[1], found[2]
        params, accuracy = train(spec)
        checkpointer.save(STEPS, params, meta={"seed": spec.seed, "train_positions": list(spec.train),
                                               "held_out_accuracy": accuracy})
        checkpointer.wait()
        return checkpointer.restore(template)
    finally:
        checkpointer.close()


def features_fn(params: dict):
    """images [B, 28, 28, 1] in [0, 1] -> features [B, 128] (jitted)."""
    return jax.jit(lambda images: MnistClassifier().apply({"params": params}, images)[0])


def labels_fn(params: dict):
    """images [B, 28, 28, 1] in [0, 1] -> predicted digits [B] (jitted)."""
    return jax.jit(lambda images: jnp.argmax(MnistClassifier().apply({"params": params}, images)[1], axis=-1))


if __name__ == "__main__":
    import shutil

    for spec in (FID, LABELS):
        shutil.rmtree(cache_dir(spec), ignore_errors=True)
        _, meta = load_or_train(spec=spec)
        print(f"cached {spec.name} in {cache_dir(spec)}: held-out accuracy {meta['held_out_accuracy']:.4f}")
