"""Evaluation harness on a real model (perplexity, streaming perplexity, passkey, agreement)."""
