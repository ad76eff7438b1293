"""Inference layer: the batch runner over clips and windows (predict, detect, embed), metrics
and plots."""
