"""The Fréchet (2-Wasserstein) distance between two Gaussians fitted to features: the FID.

    d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})        (Heusel et al., 2017, eq. 6)

Computed in float64 exactly as the standard tools do (pytorch-fid `calculate_frechet_distance`):
  * (Σ1 Σ2)^{1/2} by `scipy.linalg.sqrtm`. Σ1 Σ2 is not symmetric, and with fewer samples than
    feature dimensions the covariances are singular; if the square root comes out non-finite, εI
    (ε = 1e-6) is added to both covariances and it is taken again.
  * Round-off leaves a tiny imaginary part in the square root of a singular product: it is dropped
    when every diagonal imaginary part is below 1e-3 in absolute value; a larger one means broken
    statistics (not PSD, NaNs) and raises an error instead of returning a number.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

SINGULAR_EPS = 1e-6
IMAG_ATOL = 1e-3


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D], in float64, of features [N, D] (N >= 2)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = SINGULAR_EPS) -> float:
    """d² between N(mu1, sigma1) and N(mu2, sigma2): mu [D], sigma [D, D]; float64 throughout."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    with warnings.catch_warnings():  # singular products are expected (N < D) and handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL):
            raise ValueError(f"Fréchet distance: imaginary part {np.abs(covmean.imag).max():.3g} in "
                             "(Σ1 Σ2)^1/2; the covariances are not positive semi-definite")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
