"""Interop with Hugging Face transformers and llama.cpp: `axiom export` and `axiom import`.

names.py      the explicit name and config maps between Axiom and Llama
folder.py     reading Hugging Face folders (checked), writing output folders atomically
tokenizer.py  cl100k_base as tokenizer.json
card.py       the README.md model card
export.py     the `axiom export` command
gguf.py       `axiom export --format gguf`: one GGUF file for llama.cpp, Ollama and LM Studio
importer.py   the `axiom import` command
remote/       configuration_axiom.py and modeling_axiom.py, copied into `--format axiom` exports
"""
