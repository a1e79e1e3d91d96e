"""Interop with Hugging Face transformers and llama.cpp: the libraries behind `axiom export` and `axiom import`
(the commands are axiom/cli/export.py and axiom/cli/import_.py).

export.py     a checkpoint as a Hugging Face folder or a GGUF file
importer.py   a Hugging Face folder as a checkpoint
gguf.py       the GGUF file for llama.cpp, Ollama and LM Studio (loaded only for `--format gguf`)
hf/           Hugging Face folders: names, config and weights, tokenizer, model card, remote code
"""
