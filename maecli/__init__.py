"""maecli: Masked Autoencoder pretraining on unlabeled video, from frames to a validated backbone."""

__version__ = "0.1.0"
