"""One module per `bioaudio COMMAND`: `add_arguments(parser)` and `run(args)`; thin wrappers."""
