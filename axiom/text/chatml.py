"""The chat template: ChatML on cl100k_base's chat ids, and the one rule that says a checkpoint was tuned with it.

Each message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; a generation prompt is `<|im_start|>assistant\\n`.
`<|im_start|>` and `<|im_end|>` are ids 100264 and 100265, the ids OpenAI's cl100k chat encoding gives them; they
are not special tokens of Axiom's tiktoken encoding, so `encode_chat` places them itself and encodes every text
as ordinary text: a message that contains the string "<|im_end|>" cannot end its turn. The text between two
control ids (`{role}\\n{content}`, or the `\\n` between turns) is encoded as one piece, as a Hugging Face tokenizer
encodes the rendered template, so `tokenizer.apply_chat_template` on an export gives the same ids.

This module imports neither torch nor the loader: `axiom prepare --chat` runs `message_tokens` in workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from axiom.errors import AxiomError
from axiom.text.tokenizer import load_tokenizer

IM_START = 100264
IM_END = 100265
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
TEMPLATE_NAME = "chatml"  # the value of "chat_template" in the config.json of a checkpoint fine-tuned on chat data
ROLES = ("system", "user", "assistant")
# A reply ends with its turn's <|im_end|>; a model that starts another turn instead has finished its reply too.
TURN_END_IDS = (IM_END, IM_START)
# The same template in Jinja, as transformers' apply_chat_template renders it (written into exported tokenizers).
# Content given as a list of parts takes their text parts joined by newlines, as `axiom serve` reads them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('\\n') %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def is_chat_tuned(meta: dict) -> bool:
    """Whether a checkpoint (its config.json, `meta`) was fine-tuned on chat data with this template: training
    writes "chat_template": "chatml" there. Any other template name is an AxiomError: Axiom knows no other."""
    kind = meta.get("chat_template")
    if kind is None:
        return False
    if kind != TEMPLATE_NAME:
        raise AxiomError(f"checkpoint config.json: chat_template {kind!r} is not known; Axiom writes {TEMPLATE_NAME!r}")
    return True


@dataclass
class ChatTokens:
    ids: list[int]
    mask: list[int]  # 1 where the token is trained on: assistant content and its <|im_end|>


def message_tokens(role: str, content: str) -> ChatTokens:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` as ids, with the mask set on an assistant's content and
    `<|im_end|>`. A token that straddles the role's newline and the content (content starting with a newline)
    counts as content."""
    enc = load_tokenizer()
    head = f"{role}\n"
    body = enc.encode_ordinary(head + content)
    if role == "assistant":
        ends = np.cumsum([len(b) for b in enc.decode_tokens_bytes(body)])
        body_mask = (ends > len(head.encode())).astype(int).tolist()
    else:
        body_mask = [0] * len(body)
    trained = int(role == "assistant")
    newline = enc.encode_ordinary("\n")
    return ChatTokens([IM_START, *body, IM_END, *newline], [0, *body_mask, trained, *[0] * len(newline)])


def encode_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> ChatTokens:
    """ChatML ids and loss mask of `messages` (dicts with "role" and "content" strings), plus
    `<|im_start|>assistant\\n` when `add_generation_prompt`. The order of roles is not checked here."""
    ids: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"message {i}: need role in {ROLES} and string content, got {role!r}, {content!r:.40}")
        piece = message_tokens(role, content)
        ids += piece.ids
        mask += piece.mask
    if add_generation_prompt:
        prompt = [IM_START, *load_tokenizer().encode_ordinary("assistant\n")]
        ids += prompt
        mask += [0] * len(prompt)
    return ChatTokens(ids, mask)


def render(messages: Sequence[dict]) -> str:
    """The conversation as ChatML text (what the split hash reads)."""
    return "".join(f"{IM_START_TOKEN}{m['role']}\n{m['content']}{IM_END_TOKEN}\n" for m in messages)
