"""Training layer: the Accelerate loop and its task API, optimiser groups and EMA, schedules,
samplers and RNG, the run directory, the experiment layer (seeds x folds, artifacts, summaries),
the classification task and the pretraining objectives."""
