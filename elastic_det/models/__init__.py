"""Detectors: torchvision models built from config, and the tiny models of the embedded default."""
