"""Fréchet distances between sample and reference features: the FID of `idiff evaluate-fid` and the
periodic FID of pretrain and finetune.

    frechet.py     the Fréchet distance of two Gaussians (float64) and feature statistics
    inception.py   the Inception-v3 "FID network" of pytorch-fid in Flax, and its preprocessing
    convert.py     one-off conversion of pytorch-fid's published weight file to .npz (no torch needed)
    features.py    feature extractors by name: "inception", "mnist-classifier" (registry kind "features")
    stats.py       reference statistics: .npz files with mu and sigma, and from datasets
    metric.py      the FID of images against a reference, once or every N training steps (PeriodicFID)
    evaluate.py    the command: FID of given images, and of a run's samples (resumable), fid.json
"""
