"""The deepfake-moderation worker: video in, verdict out."""

__version__ = "0.4.8"
