"""Evaluation: perplexity, agreement with the source model, embedding similarity (the bundled texts are in headsmith.corpus)."""
