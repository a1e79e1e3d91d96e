"""Inference: the decoding engine, fast CPU paths and kernels, chat sessions, and the OpenAI server."""
