"""BYOL (Bootstrap Your Own Latent) pretraining and evaluation for images."""

__version__ = "0.1.0"
