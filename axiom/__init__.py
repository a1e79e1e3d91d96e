"""Axiom: pretrain, evaluate, sample from and publish Axiom-Dense decoder-only language models."""

__version__ = "0.1.0"
