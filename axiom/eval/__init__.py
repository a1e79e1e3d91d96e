"""Evaluation: validation loss and perplexity, multiple-choice task files, and the lm-eval adapter."""
