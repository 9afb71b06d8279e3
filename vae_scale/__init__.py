"""vae_scale: train Variational Autoencoders at scale."""

__version__ = "0.1.0"
