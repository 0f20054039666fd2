"""The floor of "FID (MNIST classifier features)" at n samples: real digits against real digits.

Reference: the 2,500 even-indexed embedded digits; samples: n of the 2,500 odd-indexed ones (5 random
draws per n). A model's FID at n samples is to be read against this floor (small-n FID is biased up).

    python tools/fid_mnist_floor.py
"""

import numpy as np

from idiff_cli.data.embedded import mnist_digits
from idiff_cli.fid.features import embed_all, get_features
from idiff_cli.fid.frechet import feature_statistics, frechet_distance

if __name__ == "__main__":
    features = get_features("mnist-classifier")
    all_features = embed_all(features, mnist_digits()[0])
    even = np.arange(len(all_features)) % 2 == 0
    ref, odd = feature_statistics(all_features[even]), all_features[~even]
    rng = np.random.default_rng(0)
    print(f"{features.label}: n odd digits vs the 2,500 even digits (mean ± std of 5 draws)")
    for n in (100, 250, 500, 1000, 2500):
        values = [frechet_distance(*feature_statistics(odd[rng.choice(len(odd), n, replace=False)]), *ref)
                  for _ in range(5)]
        print(f"  n = {n:>4}: {np.mean(values):6.2f} ± {np.std(values):.2f}")
