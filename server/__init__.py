"""mone-serve: an inference server for MoNE vision transformers with per-request compute budgets."""

__version__ = "0.1.0"
