"""Evaluation: perplexity, agreement with the source model, embedding similarity; bundled texts."""
