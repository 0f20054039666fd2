"""Image data for pretraining: the embedded offline sets (embedded.py) and tfds datasets (datasets.py)."""
