"""The model card (README.md) of an export, written from the checkpoint's config.json and the run's eval.csv."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from axiom.config import Config, ModelConfig, TrainConfig
from axiom.errors import AxiomError
from axiom.eval.loss import perplexity
from axiom.model.checkpoint import run_dir_of
from axiom.model.transformer import num_params
from axiom.text.chatml import is_chat_tuned
from axiom.text.tokenizer import EOS_ID, VOCAB_SIZE


def find_eval_csv(ckpt: Path) -> Path | None:
    """The eval.csv in the checkpoint folder, else its run's (RUN/eval.csv for RUN/checkpoints/NAME)."""
    for folder in (ckpt, run_dir_of(ckpt)):
        if folder is not None and (folder / "eval.csv").is_file():
            return folder / "eval.csv"
    return None


def eval_summary(path: Path) -> dict[str, dict] | None:
    """{"best": row, "final": row} over the rows with a validation loss, each row with step, val_loss, val_ppl."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise AxiomError(f"{path}: cannot read ({e})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise AxiomError(f"{path}: not a CSV file of UTF-8 text ({e}); fix or move it, or pass --eval-csv") from None
    evals = []
    for line, row in enumerate(rows, start=2):
        if not row.get("val_loss"):
            continue
        try:
            loss = float(row["val_loss"])
            ppl = float(row["val_ppl"]) if row.get("val_ppl") else perplexity(loss)
            bpb = float(row["val_bpb"]) if row.get("val_bpb") else None
            evals.append({"step": int(float(row["step"])), "val_loss": loss, "val_ppl": ppl, "val_bpb": bpb})
        except (KeyError, ValueError) as e:
            raise AxiomError(f"{path}:{line}: expected numeric step and val_loss columns ({e})") from None
    if not evals:
        return None
    finite = [r for r in evals if math.isfinite(r["val_loss"])]  # a diverged evaluation is no one's best
    return {"best": min(finite, key=lambda r: r["val_loss"]), "final": evals[-1]} if finite else {"final": evals[-1]}


def _table(rows: list[tuple[str, object]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def model_card(cfg: Config, meta: dict, fmt: str, dtype: str, evals: dict | None, name: str) -> str:
    """README.md of an export of format `fmt` in `dtype`: usage, architecture, data, training, evaluation, limits."""
    remote, code = _loading(fmt)
    m = cfg.model
    arch, training, evaluation = _architecture(m), _training(cfg.train, meta), _evaluation(evals)
    data = _describe_data(meta.get("data"))
    kind, per = _kind(meta)
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [axiom, axiom-dense, {"custom_code" if fmt == "axiom" else "llama"}]
---

# {name}

An Axiom-Dense decoder-only language model (Llama-style: RMSNorm, RoPE, {attention_kind(m)} attention, SwiGLU),
exported by `axiom export --format {fmt} --dtype {dtype}` from a checkpoint written by Axiom
{meta.get("axiom_version", "")}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("PATH"{remote})
model = AutoModelForCausalLM.from_pretrained("PATH"{remote})
ids = tokenizer("The meaning of life is", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))
```

{code}

## Architecture

{arch}

## Data and split

Training data: {data}. `axiom prepare` puts a document in the validation split when a hash of its text,
salted with a split seed, falls below a validation fraction; the rest is training data.

## Training

{training}

## Evaluation

Validation loss (nats per {per}), perplexity and bits per byte from the run's eval.csv:

{evaluation}

Community benchmarks: `lm_eval --model hf --model_args pretrained=PATH{remote.replace(", ", ",")} --tasks hellaswag`.

## Intended uses and limitations

Intended for research and education on language-model pretraining: studying training dynamics, comparing
against other small models, fine-tuning experiments. {kind},
and it will produce fluent but false, biased or offensive text. It saw mostly English web text,
so other languages and specialised domains are weak. Context is limited to {m.max_seq_len} tokens. Do not use
it for decisions about people or as a source of facts.
"""


def _loading(fmt: str) -> tuple[str, str]:
    """from_pretrained's extra argument for format `fmt`, and a sentence on the modelling code it needs."""
    if fmt == "axiom":
        code = (
            "The folder carries its modelling code (`configuration_axiom.py`, `modeling_axiom.py`), loaded with "
            "`trust_remote_code=True`; it imports only torch and transformers."
        )
        return ", trust_remote_code=True", code
    return "", "The weights are a native `LlamaForCausalLM`: no remote code is needed."


def _kind(meta: dict) -> tuple[str, str]:
    """What the model is, and what its validation loss is counted per."""
    if is_chat_tuned(meta):  # fine-tuned on chat data (docs/finetuning.md)
        kind = (
            "It was fine-tuned on chat data: prompt it through its chat template (ChatML, "
            "`tokenizer.apply_chat_template`; replies end at <|im_end|>); it is not aligned for safety"
        )
        return kind, "reply token: the loss is on assistant replies only"
    return "It is a base model: not instruction-tuned, not aligned for safety", "token"


def _architecture(m: ModelConfig) -> str:
    return _table(
        [
            ("parameters", f"{num_params(m):,} ({num_params(m, non_embedding=True):,} non-embedding)"),
            ("layers", m.n_layers),
            ("hidden size", m.d_model),
            ("attention heads / KV heads", f"{m.n_heads} / {m.n_kv_heads} ({attention_kind(m)})"),
            ("head dim", m.head_dim),
            ("SwiGLU width", m.ffn_dim),
            ("vocabulary", _vocabulary(m.vocab_size)),
            ("context", m.max_seq_len),
            ("positions", f"RoPE, theta {m.rope_theta:g}"),
            ("norm", f"RMSNorm, eps {m.norm_eps:g}"),
            ("tied embeddings", "yes" if m.tie_embeddings else "no"),
            ("biases", "none"),
        ]
    )


def attention_kind(m: ModelConfig) -> str:
    """What the KV heads make of the attention: one per query head, one in all, or one per group of query heads."""
    if m.n_kv_heads == m.n_heads:
        return "multi-head"
    return "multi-query" if m.n_kv_heads == 1 else "grouped-query"


def _vocabulary(size: int) -> str:
    """The vocabulary row: cl100k_base's ids as the model covers them (a test model may cover fewer, a padded
    table more), and EOS where the model has it."""
    eos = f"EOS <\\|endoftext\\|> = {EOS_ID}"
    if size < VOCAB_SIZE:
        has_eos = f"; {eos}" if size > EOS_ID else "; no EOS"
        return f"{size:,} (the first {size:,} ids of tiktoken cl100k_base: text with others cannot be read{has_eos})"
    unused = f"; {size - VOCAB_SIZE:,} more rows, unused" if size > VOCAB_SIZE else ""
    return f"{size:,} (tiktoken cl100k_base, {eos}{unused})"


def _training(t: TrainConfig, meta: dict) -> str:
    return _table(
        [
            ("optimizer steps done", f"{meta.get('step', 'not recorded')}"),
            ("tokens seen", f"{meta['tokens']:,}" if isinstance(meta.get("tokens"), int) else "not recorded"),
            ("planned", f"{t.steps:,} steps × {t.tokens_per_step:,} tokens = {t.planned_tokens:,} tokens"),
            ("batch", f"{t.micro_batch_size} × {t.seq_len} tokens × {t.grad_accum_steps} accumulation steps"),
            ("optimizer", f"{t.optimizer}, betas ({t.beta1}, {t.beta2}), weight decay {t.weight_decay}"),
            (
                "learning rate",
                f"{t.lr_max:g} peak, {t.warmup_steps} warmup steps, cosine to {t.lr_min:g} "
                f"over the final {t.decay_fraction:.0%} of steps",
            ),
            ("gradient clipping", t.grad_clip or "off"),
            ("precision", t.dtype),
            ("seed", t.seed),
        ]
    )


def _evaluation(evals: dict | None) -> str:
    if not evals:
        return "No eval.csv was found for this checkpoint, so no validation figures are reported."
    rows = [
        f"| {label} | {r['step']} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | "
        + (f"{r['val_bpb']:.4f} |" if r["val_bpb"] is not None else "– |")
        for label, r in evals.items()
    ]
    return "\n".join(["| | step | val loss | val perplexity | val bits/byte |", "|---|---|---|---|---|", *rows])


def _describe_data(data: dict | None) -> str:
    """The `data` record `axiom train` stores in a checkpoint, as one sentence."""
    if not data:
        return "not recorded in the checkpoint"
    sources = ", ".join(f"`{s}`" for s in data["sources"][:8]) + (" …" if len(data["sources"]) > 8 else "")
    return (
        f"{data['train_tokens']:,} train tokens ({data['train_docs']:,} documents) and {data['val_tokens']:,} "
        f"validation tokens ({data['val_docs']:,} documents) prepared from {sources}, split with "
        f"`val_fraction={data['val_fraction']}`, `split_seed={data['split_seed']}`"
    )
