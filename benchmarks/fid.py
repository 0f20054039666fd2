"""Throughput of `idiff evaluate-fid` on this machine, measured in one run.

  * feature extraction, images/s (compiled once, then timed): the offline MNIST classifier on 28×28
    digits, and the Inception-v3 FID network (random weights: the published ones are not needed to
    time it) on 32×32 images resized to 299, each sharded over all host devices and on one device;
  * the Fréchet distance itself (scipy sqrtm in float64) at D = 128 and D = 2048;
  * with --run RUN_DIR (an `idiff pretrain` run): the whole evaluation (sampling + features + FID)
    of --n samples, images/s, the first call including compilation, then a second one into a fresh
    feature store (steady state).

Usage: python benchmarks/fid.py [--inception-images 64] [--run runs/pretrain-mnist-cpu --n 64]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

from idiff_cli.devices import use_host_cores

use_host_cores()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from idiff_cli.diffusion.model import load  # noqa: E402
from idiff_cli.fid import evaluate, inception  # noqa: E402
from idiff_cli.fid.features import Features, embed_all, get_features  # noqa: E402
from idiff_cli.fid.frechet import feature_statistics, frechet_distance  # noqa: E402
from idiff_cli.fid.metric import fid_of_features  # noqa: E402
from idiff_cli.fid.stats import Reference  # noqa: E402


def images_per_second(features: Features, images: np.ndarray, batch: int, devices: int) -> float:
    """Steady-state images/s of `embed_all` on `devices` host devices (after one warm-up call)."""
    embed_all(features, images[:batch], batch, devices)
    start = time.perf_counter()
    embed_all(features, images, batch, devices)
    return len(images) / (time.perf_counter() - start)


def evaluation_seconds(run: pathlib.Path, features: Features, n: int, batch: int, sample_steps: int | None) -> float:
    """Seconds of sampling n images of `run` and computing their FID (a fresh feature store)."""
    pre = load(run)
    ref = Reference(np.zeros(features.dim), np.eye(features.dim), "timing only")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        feats = evaluate.sample_features(pre, pre.sampler(sample_steps), features, n, batch, 0, pathlib.Path(tmp))
        fid_of_features(feats, ref)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inception-images", type=int, default=64)
    parser.add_argument("--run", type=pathlib.Path, help="an `idiff pretrain` run directory")
    parser.add_argument("--n", type=int, default=64, help="samples of the whole-evaluation timing")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sample-steps", type=int, default=None)
    args = parser.parse_args()
    n_dev = len(jax.local_devices())
    print(f"devices: {n_dev} x {jax.devices()[0].platform}")

    from idiff_cli.data.embedded import mnist_digits

    digits = mnist_digits()[0]
    mnist = get_features("mnist-classifier")
    rates = {}
    for devices in sorted({1, n_dev}):
        rates[("mnist-classifier", devices)] = images_per_second(mnist, digits, 250, devices)
    variables = inception.random_variables(0)
    network = inception.InceptionV3FID()
    incep = Features("inception", "random-weight Inception (timing only)", inception.FEATURE_DIM,
                     lambda x: network.apply(variables, jax.numpy.broadcast_to(x, (*x.shape[:3], 3))), "random")
    images = np.random.default_rng(0).integers(0, 256, (args.inception_images, 32, 32, 3), dtype=np.uint8)
    for devices in sorted({1, n_dev}):
        rates[("inception", devices)] = images_per_second(incep, images, args.batch, devices)
    for (name, devices), rate in rates.items():
        print(f"features {name:<17} on {devices} device(s): {rate:10.1f} images/s")
    for name in ("mnist-classifier", "inception"):
        if n_dev > 1:
            print(f"  {name}: {n_dev} devices / 1 device = {rates[(name, n_dev)] / rates[(name, 1)]:.2f}x")
    print(f"  mnist-classifier / inception throughput = {rates[('mnist-classifier', n_dev)] / rates[('inception', n_dev)]:.0f}x")

    rng = np.random.default_rng(1)
    for dim in (128, 2048):
        a, b = feature_statistics(rng.normal(size=(4 * dim, dim))), feature_statistics(rng.normal(size=(4 * dim, dim)))
        start = time.perf_counter()
        frechet_distance(*a, *b)
        print(f"Fréchet distance, D = {dim}: {time.perf_counter() - start:.2f} s")

    if args.run:
        first = evaluation_seconds(args.run, mnist, args.n, args.batch, args.sample_steps)
        double = evaluation_seconds(args.run, mnist, 2 * args.n, args.batch, args.sample_steps)
        print(f"whole evaluation of {args.run}: {args.n} samples in {first:.1f} s including compilation "
              f"({args.n / first:.2f} images/s); steady state {args.n / (double - first):.2f} images/s "
              f"(from {2 * args.n} samples in {double:.1f} s)")

if __name__ == "__main__":
    main()
