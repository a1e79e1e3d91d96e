"""Chat data for `axiom prepare --chat`: rows of conversations read, checked, split and tokenized in the ChatML
template (axiom.text.chatml).

This module imports neither torch nor the loader: `axiom prepare --chat` runs `tokenize_chat_unit` in workers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from axiom.data import sources
from axiom.data.sources import Unit, UnitResult
from axiom.errors import AxiomError
from axiom.files import atomic_file
from axiom.text.chatml import IM_END, IM_START, ROLES, TEMPLATE_NAME, ChatTokens, message_tokens, render
from axiom.text.tokenizer import EOS_ID

CHAT_FIELDS = ("messages", "conversations")  # OpenAI / Hugging Face chat rows, ShareGPT rows
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
ORDER_RULE = "an optional system message first, then user and assistant alternating, ending with assistant"
OVERFLOW = ("truncate", "skip")


# ---- rows of chat data


def conversation(row: object) -> list[dict]:
    """A data row as [{"role", "content"}, ...]: `messages` (role system|user|assistant, content) or ShareGPT
    `conversations` (from system|human|gpt, value). Raises ValueError saying what is wrong with the row."""
    if not isinstance(row, dict) or not any(row.get(f) is not None for f in CHAT_FIELDS):
        if null := [f for f in CHAT_FIELDS if isinstance(row, dict) and f in row]:  # parquet: a null cell
            raise ValueError(f"'{null[0]}' is null; expected a non-empty list of messages")
        found = ", ".join(row) if isinstance(row, dict) else f"a JSON {type(row).__name__}"
        raise ValueError(f"no field 'messages' or 'conversations' (found: {found})")
    sharegpt = row.get("messages") is None
    turns = row["conversations"] if sharegpt else row["messages"]
    role_key, content_key, names = ("from", "value", SHAREGPT_ROLES) if sharegpt else ("role", "content", None)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{'conversations' if sharegpt else 'messages'}' must be a non-empty list of messages")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"message {i} is {type(turn).__name__}, expected an object with {role_key!r}")
        role = turn.get(role_key)
        known = names or {r: r for r in ROLES}
        if not isinstance(role, str) or role not in known:
            raise ValueError(f"message {i}: unknown {role_key} {role!r}; expected one of {', '.join(known)}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): {content_key} is {type(content).__name__}, expected a string")
        if not content.strip():
            raise ValueError(f"message {i} ({role}): empty {content_key}")
        if not sources.is_valid_text(content):
            raise ValueError(f"message {i} ({role}): {content_key} holds a lone surrogate (not valid Unicode text)")
        messages.append({"role": known[role], "content": content})
    check_order(messages)
    return messages


def check_order(messages: list[dict]) -> None:
    """The order rule: an optional system message, then user/assistant pairs; the last message is assistant's."""
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError("no assistant turn: nothing to train on")
    start = 1 if roles[0] == "system" else 0
    for i, role in enumerate(roles[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            after = f"after {roles[i - 1]}" if i else "first"
            raise ValueError(f"roles out of order: message {i} is {role} {after}; expected {ORDER_RULE}")
    if roles[-1] != "assistant":
        raise ValueError(f"roles out of order: the last message is {roles[-1]}; expected {ORDER_RULE}")


def fit(messages: list[dict], pieces: list[ChatTokens], seq_len: int, overflow: str) -> int:
    """How many messages of a conversation to keep so that its tokens and EOS fit in `seq_len`: all of them, or
    (overflow "truncate") the longest prefix that ends with an assistant message; 0 means skip it."""
    total = sum(len(p.ids) for p in pieces) + 1
    if total <= seq_len:
        return len(pieces)
    if overflow == "skip":
        return 0
    keep, length = 0, 1
    for i, p in enumerate(pieces):
        length += len(p.ids)
        if length > seq_len:
            break
        if messages[i]["role"] == "assistant":
            keep = i + 1
    return keep


# ---- prepare --chat: planning and tokenizing units of work


def is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def plan_chat_units(files: list[Path]) -> list[Unit]:
    """Units of JSON Lines and parquet chat files (as for text); parquet needs a list column of CHAT_FIELDS."""
    units = []
    for path in files:
        kind = sources.kind_of(path)
        if kind == ".txt":
            raise AxiomError(f"{path}: chat data is JSON Lines or parquet rows with 'messages' or 'conversations'")
        if kind != ".parquet":
            units += sources.plan_units([path], "text")  # the field is checked per row
            continue
        try:
            meta = pq.ParquetFile(path).metadata
            schema = meta.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as e:
            raise AxiomError(f"{path}: not a readable parquet file ({' '.join(str(e).split())[:160]})") from e
        lists = [c for c in CHAT_FIELDS if c in schema.names and is_list(schema.field(c).type)]  # not all-null
        column = lists[0] if lists else None
        if column is None:
            raise AxiomError(
                f"{path}: no list column 'messages' or 'conversations' (columns: {', '.join(schema.names)})"
            )
        units += [
            Unit(".parquet", (str(path),), rg, rg + 1, sources.column_bytes(meta, rg, column))
            for rg in range(meta.num_row_groups)
        ]
    return units


@dataclass
class ChatUnitResult(UnitResult):
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # split -> uint8, 1 where the token is trained
    trained: dict[str, int] = field(default_factory=dict)  # split -> tokens with mask 1
    truncated: int = 0  # conversations cut to fewer messages to fit seq_len
    skipped_long: int = 0  # conversations skipped: not even their first exchange fits


def tokenize_chat_unit(unit: Unit, val_fraction: float, split_seed: int, seq_len: int, overflow: str) -> ChatUnitResult:
    """Read, check, split and tokenize the conversations of one unit (runs in a worker process). Each becomes
    its ChatML ids then EOS; the mask marks trained tokens; `text_bytes` counts the kept assistant text."""
    salt = f"{split_seed}:".encode()
    ids: dict[str, list] = {"train": [], "val": []}
    masks: dict[str, list] = {"train": [], "val": []}
    docs, text_bytes, trained = ({"train": 0, "val": 0} for _ in range(3))
    truncated = skipped = 0
    for row, where in sources.read_rows(unit, CHAT_FIELDS):
        try:
            messages = conversation(row)
        except ValueError as e:
            raise AxiomError(f"{where()}: {e}") from None
        split = "val" if sources.is_val(render(messages).encode("utf-8"), salt, val_fraction) else "train"
        pieces = [message_tokens(m["role"], m["content"]) for m in messages]
        keep = fit(messages, pieces, seq_len, overflow)
        if keep == 0:
            skipped += 1
            continue
        truncated += keep < len(pieces)
        for piece in pieces[:keep]:
            ids[split].append(piece.ids)
            masks[split].append(piece.mask)
            trained[split] += sum(piece.mask)
        ids[split].append([EOS_ID])
        masks[split].append([0])
        docs[split] += 1
        text_bytes[split] += sum(len(m["content"].encode()) for m in messages[:keep] if m["role"] == "assistant")
    return ChatUnitResult(
        tokens={s: _concat(ids[s], "<u4") for s in ids},
        docs=docs,
        text_bytes=text_bytes,
        skipped_empty=0,
        est_bytes=unit.est_bytes,
        masks={s: _concat(masks[s], "u1") for s in masks},
        trained=trained,
        truncated=truncated,
        skipped_long=skipped,
    )


def _concat(parts: list[list[int]], dtype: str) -> np.ndarray:
    return np.fromiter((t for p in parts for t in p), dtype=dtype)


def chat_settings(seq_len: int, overflow: str) -> dict:
    """What a chat directory's tokens depend on besides the text settings (stored in the manifest)."""
    if seq_len < 8 or overflow not in OVERFLOW:
        raise AxiomError(f"prepare --chat: need --seq-len >= 8 and --overflow {' or '.join(OVERFLOW)}")
    return {
        "template": TEMPLATE_NAME,
        "im_start_id": IM_START,
        "im_end_id": IM_END,
        "seq_len": seq_len,
        "overflow": overflow,
    }


def to_jsonl(conversations: Sequence[Sequence[dict]], path: Path) -> None:
    """Write conversations as `messages` rows of JSON Lines (for the demo and tests), whole or not at all."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": list(messages)}, ensure_ascii=False) + "\n")


def new_chat_counts() -> dict:
    """The chat counters `axiom prepare` keeps in its state file beside the text ones."""
    return {"truncated": 0, "skipped_long": 0, "trained": {"train": 0, "val": 0}}


def count_chat(counts: dict, result: ChatUnitResult) -> None:
    counts["truncated"] += result.truncated
    counts["skipped_long"] += result.skipped_long
    for split, n in result.trained.items():
        counts["trained"][split] += n


def chat_totals(counts: dict) -> dict:
    """The manifest keys of chat data beside the text ones."""
    return {
        "train_trained_tokens": counts["trained"]["train"],
        "val_trained_tokens": counts["trained"]["val"],
        "truncated_conversations": counts["truncated"],
        "skipped_long_conversations": counts["skipped_long"],
    }
