"""cl100k_base as a Hugging Face fast tokenizer (`tokenizer.json` + `tokenizer_config.json`).

Built from the same offline, hash-checked BPE file as axiom.text.tokenizer. Ids are tiktoken's: the special
tokens keep their ids (EOS <|endoftext|> = 100257), and the unused ids of cl100k_base stay unused. A model
fine-tuned on chat data also gets the ChatML tokens <|im_start|> = 100264 and <|im_end|> = 100265 and the chat
template (axiom.text.chatml), so that `apply_chat_template` gives `encode_chat`'s ids.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from axiom.text.chatml import CHAT_TEMPLATE, IM_END, IM_END_TOKEN, IM_START, IM_START_TOKEN
from axiom.text.tokenizer import EOS_ID, PAT_STR, SPECIAL_TOKENS, default_bpe_file, load_tokenizer

EOS_TOKEN = "<|endoftext|>"
# The `tokenizers` library matches with Oniguruma, which reads `{1,3}+` as "one or more runs of 1-3 digits",
# not as tiktoken's possessive `{1,3}`; the other possessive quantifiers mean the same in both engines.
HF_PAT_STR = PAT_STR.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")
assert HF_PAT_STR != PAT_STR
CHAT_TOKENS = {IM_START_TOKEN: IM_START, IM_END_TOKEN: IM_END}


@functools.lru_cache(maxsize=2)
def tokenizer_json(chat: bool = False) -> str:
    """The serialized `tokenizers.Tokenizer` (about 14 MB; built once per process), with `chat` the ChatML
    tokens too."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import TikTokenConverter

    load_tokenizer()  # verifies the file's hash
    path = str(default_bpe_file())
    vocab, merges = TikTokenConverter(vocab_file=path, pattern=HF_PAT_STR).extract_vocab_merges_from_model(path)
    # Special tokens go into the vocabulary at tiktoken's ids; adding them as new tokens would renumber them.
    special = {**SPECIAL_TOKENS, **(CHAT_TOKENS if chat else {})}
    vocab.update(special)
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(HF_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID and all(tok.token_to_id(t) == i for t, i in special.items())
    return tok.to_str()


def write_tokenizer(directory: Path, max_seq_len: int, chat: bool = False) -> None:
    """tokenizer.json and tokenizer_config.json into `directory`; no BOS is added, EOS doubles as padding.
    `chat`: with the ChatML tokens and `chat_template`."""
    (directory / "tokenizer.json").write_text(tokenizer_json(chat), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len,
    }
    if chat:
        config["additional_special_tokens"] = list(CHAT_TOKENS)
        config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
