"""Benchmarks: training steps and decoding timed against transformers' Llama and llama.cpp (`axiom bench`)."""
