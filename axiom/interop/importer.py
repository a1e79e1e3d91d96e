"""A Hugging Face folder (either export format, or any compatible Llama) as an Axiom checkpoint.

The checkpoint holds float32 weights and config.json, as `axiom train` writes them without training state:
`axiom eval` and `axiom generate --ckpt` read it, and continued pretraining starts a fresh optimizer from
these weights. A folder written by `axiom export` carries the original config.json, which is restored.
"""

from __future__ import annotations

import logging
from pathlib import Path

from axiom.config import apply_overrides
from axiom.errors import AxiomError
from axiom.files import check_no_overlap, check_replaceable, staged_output
from axiom.interop.hf.folder import read_folder
from axiom.model.checkpoint import save_weights, write_checksums
from axiom.text.tokenizer import NAME, VOCAB_SIZE

logger = logging.getLogger(__name__)


def import_hf(src: str | Path, out: str | Path, force: bool = False, overrides: list[str] | None = None) -> Path:
    """Convert the Hugging Face folder `src` into the checkpoint folder `out`; returns `out`."""
    out = check_replaceable(out, "import", force)
    check_no_overlap(out, {"--hf": src})
    with staged_output(out, "import", force) as tmp:
        fmt, cfg, state, progress = read_folder(src)
        new = apply_overrides(cfg, overrides)
        if new.model != cfg.model:
            raise AxiomError("--set may change training fields only; the model's shape comes from the weights")
        save_weights(state, new, tmp, **{**progress, "imported_from": str(src), "imported_format": fmt})
        write_checksums(tmp)
    if cfg.model.vocab_size != VOCAB_SIZE:
        theirs, ours = f"{cfg.model.vocab_size:,}", f"{VOCAB_SIZE:,}"
        why = f"it was trained with another tokenizer, and axiom's commands read and write text with {NAME}"
        logger.warning("notice: %s", f"{src} has {theirs} token ids where {NAME} has {ours}: {why}, wrongly for it")
    return out
