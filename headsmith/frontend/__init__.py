"""Frontends: resolve and load checkpoints (HF directories, GGUF files, built-in names), capture them."""
