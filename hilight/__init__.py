"""HiLight: a video-language assistant (CLIP-ViP + Long-CLIP + TokenMining + Gemma)."""

__version__ = "0.1.0"
