"""`axiom export --format gguf`: a checkpoint as one GGUF file for llama.cpp, Ollama and LM Studio.

Written with the `gguf` package (the ggml project's own writer) the way llama.cpp's convert_hf_to_gguf.py
writes a Llama:

    architecture  `llama`; context length, widths, heads, RoPE theta and dimension, RMS eps, vocabulary size
    tensors       llama.cpp's names (GGUF_NAMES below), norms always float32, matrices in --dtype;
                  q_proj and k_proj rows reordered from rotate-half to llama.cpp's adjacent-pair RoPE;
                  a tied output layer is not stored: llama.cpp reuses token_embd.weight
    tokenizer     cl100k_base as GPT-2-style byte-level BPE (`gpt2`): tokens, token types and merges from the
                  same tokenizer.json the Hugging Face export writes; pre-tokenizer `dbrx` (llama.cpp's name
                  for the cl100k regex); EOS <|endoftext|> 100257, also BOS and padding, never added
    chat          a checkpoint with "chat_template": "chatml" also gets tokenizer.chat_template, names
                  ids 100264/100265 <|im_start|>/<|im_end|> and ends a turn (EOT) at <|im_end|>
"""

from __future__ import annotations

import functools
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from axiom import __version__
from axiom.config import ModelConfig
from axiom.dtypes import GGUF_DTYPES, short_name
from axiom.errors import AxiomError, require
from axiom.files import atomic_file, describe_missing
from axiom.interop.hf.names import to_llama
from axiom.interop.hf.tokenizer import tokenizer_json
from axiom.text.chatml import IM_END, IM_START
from axiom.text.tokenizer import EOS_ID, VOCAB_SIZE

ARCH = "llama"
PRE_TOKENIZER = "dbrx"  # llama.cpp's pre-tokenizer with cl100k_base's regex (its converter picks it for cl100k)
CHAT_TOKENS = {IM_START: "<|im_start|>", IM_END: "<|im_end|>"}
DTYPES = tuple(map(short_name, GGUF_DTYPES))  # --dtype: f32, bf16, f16, q8_0
# Our record, among the first keys of every file we write: axiom's version, and the file's size once written (so a
# file that another tool rewrote from ours, keeping the metadata as llama-quantize does, is not taken for ours).
AXIOM_KEY = "axiom.version"
SIZE_KEY = "axiom.file_size"
LEADING_FIELDS = 8  # how many of a file's first fields are read to find our record
# GGUF's value types of fixed size (gguf.GGUFValueType) as struct formats; type 8 is a string, 9 an array
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING_TYPE = 8

# Llama name (axiom.interop.hf.names) -> llama.cpp's GGUF name; "{i}" is the block index.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",  # only when the embeddings are not tied
}


def gguf_name(llama_name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`."""
    parts = llama_name.split(".")
    if parts[:2] == ["model", "layers"]:
        return GGUF_NAMES[".".join(["model", "layers", "{i}", *parts[3:]])].format(i=parts[2])
    return GGUF_NAMES[llama_name]


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads*hd, d) q or k projection -> the same rows ordered for llama.cpp's RoPE.

    Axiom (like Hugging Face Llama) rotates row j of a head together with row j + hd/2 ("rotate half");
    llama.cpp's `llama` architecture rotates rows 2j and 2j+1. Moving row j + c*hd/2 to 2j + c gives the
    same attention scores."""
    rows, d = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, d).transpose(1, 2).reshape(rows, d)


def _gguf():
    return require("gguf", "--format gguf", "axiom-lm[gguf]")


def gguf_tensors(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Axiom state dict (a tied table stored once) -> {GGUF name: float32 tensor} in llama.cpp's layout."""
    out = {}
    for name, w in to_llama(state, m).items():
        if name.endswith("q_proj.weight"):
            w = interleave_rope_rows(w, m.n_heads)
        elif name.endswith("k_proj.weight"):
            w = interleave_rope_rows(w, m.n_kv_heads)
        out[gguf_name(name)] = w.float()
    return out


@functools.lru_cache(maxsize=1)
def _cl100k_bpe() -> tuple[dict[int, str], dict[int, str], list[str]]:
    """({id: byte-level token}, {id: special token}, merges as "left right") from the HF export's tokenizer.json."""
    spec = json.loads(tokenizer_json())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    special = {t["id"]: t["content"] for t in spec["added_tokens"]}
    # byte-level strings never hold a real space, so "left right" is unambiguous
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in spec["model"]["merges"]]
    return by_id, special, merges


def vocabulary(vocab_size: int, chat: bool) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of cl100k_base as llama.cpp's `gpt2` BPE, padded to `vocab_size` ids.

    Byte-level token strings and merges come from the same tokenizer.json as the Hugging Face export; ids
    that cl100k_base leaves unused are `[PAD<id>]` of type UNUSED, as llama.cpp's converter writes them."""
    gguf = _gguf()
    by_id, special, merges = _cl100k_bpe()
    if chat:
        special = special | CHAT_TOKENS
    tokens, types = [], []
    for i in range(vocab_size):
        if i in special:
            tokens.append(special[i])
            types.append(gguf.TokenType.CONTROL)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, types, merges


def check_out_file(out: str | Path, force: bool) -> Path:
    """Refuse a directory, an existing file without `force`, and with `force` a file that axiom did not write as it
    is (so --force only ever replaces an earlier export); call before slow work, and again under the lock."""
    out = Path(out)
    if out.is_dir():
        raise AxiomError(f"--out {out} is a directory; --format gguf writes one file, e.g. --out model.gguf")
    if out.exists() and not force:
        raise AxiomError(f"--out {out} exists; pass --force to replace it")
    why = not_ours(out) if out.exists() else None
    if why is not None:
        raise AxiomError(f"--out {out} {why}; --force replaces only an earlier GGUF export")
    return out


def not_ours(path: Path) -> str | None:
    """Why the existing `path` is not a GGUF file that axiom wrote, unchanged since (its AXIOM_KEY present, its
    size the SIZE_KEY recorded), or None."""
    if not path.is_file():
        return describe_missing(path) + ", not a GGUF file"
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return "is not a GGUF file"
            fields = leading_fields(f)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except (struct.error, ValueError):
        return "is not a readable GGUF file"
    if AXIOM_KEY not in fields:
        return f"is a GGUF file without axiom's record (no {AXIOM_KEY} key: another program's, or an older axiom's)"
    if fields.get(SIZE_KEY, (0, None))[1] != path.stat().st_size:
        return "is a GGUF file changed since axiom wrote it (its size is not the one recorded in it)"
    return None


def leading_fields(f) -> dict[str, tuple[int, object]]:
    """The first metadata fields of the (little-endian) GGUF file `f` that are numbers or strings, up to the first
    array or LEADING_FIELDS fields, as {key: (offset of the value, value)}: where axiom's record is, read in
    microseconds (gguf's reader parses all 330k token strings first)."""
    f.seek(0)
    magic, version, _, count = struct.unpack("<4sIQQ", f.read(24))
    if magic != b"GGUF" or version < 2:  # version 1 counted in 32 bits
        return {}
    fields = {}
    for _ in range(min(count, LEADING_FIELDS)):
        key = _read_string(f)
        (kind,) = struct.unpack("<I", f.read(4))
        offset = f.tell()
        if kind == STRING_TYPE:
            value = _read_string(f)
        elif kind in SCALAR_FORMATS:
            form = "<" + SCALAR_FORMATS[kind]
            (value,) = struct.unpack(form, f.read(struct.calcsize(form)))
        else:
            break
        fields[key] = (offset, value)
    return fields


def _read_string(f) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > 1 << 16:  # no key or leading value is this long: not a GGUF header
        raise ValueError(f"a {n}-byte string")
    return f.read(n).decode("utf-8", errors="replace")


def _record_size(path: Path) -> None:
    """Put the size of the written file `path` into its SIZE_KEY (written as 0: the size is known only now)."""
    with open(path, "r+b") as f:
        offset = leading_fields(f)[SIZE_KEY][0]
        f.seek(offset)
        f.write(struct.pack("<Q", os.fstat(f.fileno()).st_size))


def gguf_writer(
    state: dict[str, torch.Tensor],
    m: ModelConfig,
    dtype: str = "f32",
    name: str = "axiom",
    template: str | None = None,
):
    """A gguf.GGUFWriter holding everything the file will: metadata, tokenizer and tensors (nothing written yet).

    `state`: Axiom names, float32, a tied table once; `dtype`: f32, bf16, f16 or q8_0; `template` (Jinja)
    marks a chat model."""
    gguf = _gguf()
    if dtype not in DTYPES:
        raise AxiomError(f"--dtype {dtype!r}: --format gguf writes {', '.join(DTYPES)}")
    if m.vocab_size < VOCAB_SIZE:
        raise AxiomError(
            f"--format gguf: the model's vocab_size is {m.vocab_size}, smaller than cl100k_base's {VOCAB_SIZE:,}; "
            "a GGUF file carries the tokenizer, so the model must cover its ids"
        )
    # ggml's type of the matrices (F32, BF16, F16, Q8_0) and llama.cpp's type of the whole file
    file_type = gguf.LlamaFileType["ALL_F32" if dtype == "f32" else f"MOSTLY_{dtype.upper()}"]
    w = gguf.GGUFWriter(None, ARCH)
    w.add_string(AXIOM_KEY, __version__)
    w.add_uint64(SIZE_KEY, 0)  # the file's size, recorded once it is written (write_gguf)
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_architecture(w, m)
    _add_tokenizer(w, m.vocab_size, template)
    _add_tensors(w, gguf_tensors(state, m), gguf.GGMLQuantizationType[dtype.upper()])
    return w


def _add_architecture(w, m: ModelConfig) -> None:
    """The `llama` architecture's hyperparameters."""
    w.add_vocab_size(m.vocab_size)
    w.add_context_length(m.max_seq_len)
    w.add_embedding_length(m.d_model)
    w.add_block_count(m.n_layers)
    w.add_feed_forward_length(m.ffn_dim)
    w.add_head_count(m.n_heads)
    w.add_head_count_kv(m.n_kv_heads)
    w.add_key_length(m.head_dim)
    w.add_value_length(m.head_dim)
    w.add_rope_dimension_count(m.head_dim)
    w.add_rope_freq_base(m.rope_theta)
    w.add_layer_norm_rms_eps(m.norm_eps)


def _add_tokenizer(w, vocab_size: int, template: str | None) -> None:
    """cl100k_base as `gpt2` BPE, EOS as BOS and padding too; with a chat `template`, its end of turn."""
    tokens, types, merges = vocabulary(vocab_size, chat=template is not None)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(EOS_ID)  # only for runtimes that insist on one; every training document followed EOS
    w.add_eos_token_id(EOS_ID)
    w.add_pad_token_id(EOS_ID)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if template is not None:
        w.add_chat_template(template)
        w.add_eot_token_id(IM_END)  # llama.cpp ends generation at EOS and at EOT


def _add_tensors(w, tensors: dict[str, torch.Tensor], qtype) -> None:
    """Matrices packed as ggml type `qtype`, norms float32."""
    gguf = _gguf()
    for gname, tensor in tensors.items():
        data = tensor.detach().cpu().numpy()
        if data.ndim == 1:  # norms stay float32, as llama.cpp expects
            w.add_tensor(gname, data)
            continue
        try:
            packed, t = gguf.quants.quantize(data, qtype), qtype
        except gguf.QuantError:  # q8_0 needs rows a multiple of 32 wide: float16 then, as llama.cpp's converter
            packed, t = data.astype(np.float16), gguf.GGMLQuantizationType.F16
        w.add_tensor(gname, packed, raw_dtype=t)  # the writer reads a quantized shape from its bytes


def write_gguf(
    state: dict[str, torch.Tensor],
    m: ModelConfig,
    out: str | Path,
    dtype: str = "f32",
    name: str = "axiom",
    template: str | None = None,
) -> Path:
    """Write the GGUF file `out` (see gguf_writer for the arguments) through `atomic_file`; a failure leaves no
    temporary file and raises one AxiomError line."""
    out = Path(out)
    w = gguf_writer(state, m, dtype, name, template)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as tmp:
            try:
                w.write_header_to_file(path=tmp)
                w.write_kv_data_to_file()
                w.write_tensors_to_file()
            finally:
                w.close()
            _record_size(tmp)
    except OSError as e:
        raise AxiomError(f"--out {out}: cannot write ({e.strerror or e})") from None
    return out
