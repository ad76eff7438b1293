"""Data layer: audio decoding and windows, frontends, manifests and label formats, datasets,
splits, normalisation statistics, feature caches, augmentations and the demo dataset.
Imports nothing above it (models, training, inference, commands)."""
