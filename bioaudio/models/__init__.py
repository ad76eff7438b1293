"""Model layer: shared transformer blocks and heads, CNN baselines, `AudioModel` (frontend +
encoder + head), the registry of model types / checkpoint formats / pretraining objectives, and
reading and writing checkpoints. Reaches `beats/` and `eat/` only through the registry."""
