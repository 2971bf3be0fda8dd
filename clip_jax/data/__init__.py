"""Input data: the embedded synthetic dataset, tokenizers, and the Grain pipeline."""
