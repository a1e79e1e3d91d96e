"""The model: the Axiom-Dense modules, the KV cache, the chunked loss, and checkpoint folders."""
