"""Fréchet distances between sample and reference features: the FID of `idiff evaluate-fid`.

    frechet.py     the Fréchet distance of two Gaussians (float64) and feature statistics
    inception.py   the Inception-v3 "FID network" of pytorch-fid in Flax, and its preprocessing
    convert.py     one-off conversion of pytorch-fid's published weight file to .npz (no torch needed)
    features.py    feature extractors by name: "inception", "mnist-classifier" (registry kind "features")
    classifier.py  the small MNIST classifier behind "mnist-classifier", trained by the project
    stats.py       reference statistics: .npz files with mu and sigma, and from datasets
    evaluate.py    FID of given images, and of a pretrained run's samples (resumable), fid.json
"""
