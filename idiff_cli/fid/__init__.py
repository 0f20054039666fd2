"""Fréchet distances between sample and reference features: the FID of `idiff evaluate-fid`.

    frechet.py     the Fréchet distance of two Gaussians (float64) and feature statistics
    inception.py   the Inception-v3 "FID network" of pytorch-fid in Flax, and its preprocessing
    convert.py     one-off conversion of pytorch-fid's published weight file to .npz (no torch needed)
"""
