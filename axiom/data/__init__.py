"""Data: reading corpora, `axiom prepare` (token shards, the split, restart), and the training loaders."""
