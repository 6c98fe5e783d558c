"""The hooks the trainer installs: logger, data trace, goodput, evaluation and checkpoint."""
