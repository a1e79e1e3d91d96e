"""Hugging Face folders.

names.py      the explicit name and config maps between Axiom and Llama
folder.py     reading Hugging Face folders (checked) and the config.json of an export
tokenizer.py  cl100k_base as tokenizer.json
card.py       the README.md model card
remote/       configuration_axiom.py and modeling_axiom.py, copied into `--format axiom` exports
"""
