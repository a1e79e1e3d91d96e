"""Token ids to text as they are decoded, and where a reply ends: the one text stream of every decoding command.

`axiom generate`, `axiom chat`, `axiom serve` and lm-eval's `generate_until` each feed a `TextStream` one token at
a time and show (or collect) what it returns. It decodes UTF-8 across token boundaries (a character may take
several tokens), leaves out the stop ids and ends at the first of them, and ends before the first stop string,
holding back only the tail that may be the start of one. Each token costs the same however long the text is.

The one stop rule (`stop_ids`): every text ends at EOS; a chat reply also ends at its turn's <|im_end|> and where
the model starts another turn (<|im_start|>).
"""

from __future__ import annotations

import codecs
from collections.abc import Collection, Sequence

import tiktoken

from axiom.text.chatml import TURN_END_IDS
from axiom.text.tokenizer import EOS_ID, load_tokenizer


def stop_ids(chat: bool) -> tuple[int, ...]:
    """The ids that end a text: EOS, and for a reply in the chat template also the ids that end its turn."""
    return (EOS_ID, *TURN_END_IDS) if chat else (EOS_ID,)


def token_bytes(enc: tiktoken.Encoding, token: int) -> bytes:
    """The bytes a token stands for; an id the vocabulary leaves unassigned (cl100k_base has 100261-100275, which an
    untrained model may still pick) shows as U+FFFD."""
    try:
        return enc.decode_single_token_bytes(token)
    except KeyError:
        return "\ufffd".encode()


class TextStream:
    """The text of one sequence of new tokens: `push` each token and show what it returns; `finish` once no more
    tokens come. After a stop id or a stop string (`stopped`), the text is final and further tokens are ignored.

    Bytes of a character cut off by a stop id or by `finish` show as U+FFFD, as an invalid byte does mid-text."""

    def __init__(
        self, stop_ids: Collection[int], stop_strings: Sequence[str] = (), enc: tiktoken.Encoding | None = None
    ):
        self.enc = enc if enc is not None else load_tokenizer()
        self.stop_ids = tuple(stop_ids)
        self.stop_strings = [s for s in stop_strings if s]  # an empty stop string would end every text at once
        self.stopped = False  # ended at a stop id or before a stop string
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded, not yet shown: it may be the start of a stop string
        self._shown: list[str] = []
        self._borders = [_borders(s) for s in self.stop_strings]
        self._matched = [0] * len(self.stop_strings)  # per stop string: the longest tail of the text it starts with

    @property
    def text(self) -> str:
        """Everything shown so far."""
        return "".join(self._shown)

    def push(self, token: int) -> str:
        """Add a token; returns the text that is now final (maybe empty)."""
        if self.stopped:
            return ""
        if token in self.stop_ids:
            self.stopped = True
            return self._show(self._decoder.decode(b"", final=True), final=True)
        return self._show(self._decoder.decode(token_bytes(self.enc, token)), final=False)

    def finish(self) -> str:
        """No more tokens: flush the decoder and the held-back tail."""
        if self.stopped:
            return ""
        return self._show(self._decoder.decode(b"", final=True), final=True)

    def _show(self, new: str, final: bool) -> str:
        """Show the held-back tail plus `new` up to a stop string in them; unless `final`, hold back their longest
        tail that a stop string starts with. Only that much is searched, never the text already shown: no stop
        string can begin there, since its start would have been held back."""
        pending = self._held + new
        cut = min((i for s in self.stop_strings if (i := pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped, pending, final = True, pending[:cut], True
        hold = 0 if final else self._stop_prefix(new)
        piece, self._held = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self._shown.append(piece)
        return piece

    def _stop_prefix(self, new: str) -> int:
        """The length of the longest tail of the text, `new` included, that is a proper prefix of a stop string.
        Each stop string's match grows by one character at a time (Knuth-Morris-Pratt), so a token costs its
        own length, not the square of a stop string's."""
        for j, (stop, borders) in enumerate(zip(self.stop_strings, self._borders, strict=True)):
            k = self._matched[j]
            for c in new:
                while k and stop[k] != c:
                    k = borders[k - 1]
                k += stop[k] == c
            self._matched[j] = k
        return max(self._matched, default=0)


def _borders(s: str) -> list[int]:
    """KMP's failure function: for each i, the length of the longest proper prefix of s[: i + 1] that is also
    its suffix."""
    borders = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = borders[k - 1]
        k += s[i] == s[k]
        borders[i] = k
    return borders
