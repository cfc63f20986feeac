"""Tink: a self-hosted worker that trains LoRA adapters and samples from them over the Tinker protocol."""

__version__ = "0.1.0"
