"""The one text stream (axiom.text.stream): UTF-8 across token boundaries, stop ids, stop strings that span tokens,
the one stop rule, and each token costing the same however long the text already is."""

from __future__ import annotations

import time

import pytest

from axiom.text.chatml import IM_END, IM_START
from axiom.text.stream import TextStream, stop_ids
from axiom.text.tokenizer import EOS_ID, load_tokenizer


class CountingEncoding:
    """The tokenizer, counting the tokens turned into bytes."""

    def __init__(self):
        self.enc, self.calls = load_tokenizer(), 0

    def decode_single_token_bytes(self, token: int) -> bytes:
        self.calls += 1
        return self.enc.decode_single_token_bytes(token)


def push_all(text: TextStream, tokens: list[int]) -> list[str]:
    return [text.push(t) for t in tokens]


def test_a_character_split_across_tokens_shows_once_it_is_whole():
    enc = load_tokenizer()
    tokens = enc.encode_ordinary("🚀")
    assert len(tokens) > 1  # its four bytes take several tokens
    text = TextStream(stop_ids(chat=False))
    pieces = push_all(text, tokens)
    assert pieces[:-1] == [""] * (len(tokens) - 1) and pieces[-1] == "🚀"
    assert text.finish() == "" and text.text == "🚀" and not text.stopped


def test_cut_off_bytes_and_unassigned_ids_show_as_replacement_characters():
    first = load_tokenizer().encode_ordinary("🚀")[0]
    text = TextStream(stop_ids(chat=False))
    assert text.push(first) == ""
    assert text.push(EOS_ID) == "\ufffd" and text.stopped  # the stop id ends the text mid-character
    unassigned = TextStream(stop_ids(chat=False))
    assert unassigned.push(100261) == "\ufffd"  # an id cl100k_base leaves unassigned
    assert unassigned.finish() == "" and unassigned.text == "\ufffd"


def test_stop_ids_end_the_text_and_are_left_out():
    enc = load_tokenizer()
    text = TextStream(stop_ids(chat=False))
    assert "".join(push_all(text, [*enc.encode_ordinary("Hi there"), EOS_ID])) == "Hi there" and text.stopped
    assert text.push(enc.encode_ordinary("more")[0]) == "" and text.finish() == "" and text.text == "Hi there"


def test_the_one_stop_rule():
    assert stop_ids(chat=False) == (EOS_ID,)  # plain text (generate, completions, lm-eval) ends at EOS only
    assert set(stop_ids(chat=True)) == {EOS_ID, IM_END, IM_START}  # a reply ends with its turn or at a new one
    enc = load_tokenizer()
    reply = [*enc.encode_ordinary("Sure."), IM_START, *enc.encode_ordinary("user\nThanks")]
    chat = TextStream(stop_ids(chat=True))
    assert "".join(push_all(chat, reply)) == "Sure." and chat.stopped
    plain = TextStream(stop_ids(chat=False))
    assert "".join([*push_all(plain, [*enc.encode_ordinary("Sure."), IM_END]), plain.finish()]) == "Sure.\ufffd"


def test_a_stop_string_across_tokens_ends_the_text_before_it():
    enc = load_tokenizer()
    tokens = enc.encode_ordinary("Hello world, and more")
    assert enc.decode(tokens[:1]) == "Hello"
    text = TextStream(stop_ids(chat=False), ["o w", "zzz"])
    assert text.push(tokens[0]) == "Hell"  # "o" may start "o w": held back
    assert text.push(tokens[1]) == "" and text.stopped  # " world" completes it
    assert push_all(text, tokens[2:]) == [""] * (len(tokens) - 2)
    assert text.finish() == "" and text.text == "Hell"
    # a held-back tail that turns out not to be a stop string is shown with the next token, or by finish()
    text = TextStream(stop_ids(chat=False), ["o!"])
    assert text.push(tokens[0]) == "Hell" and text.push(tokens[1]) == "o world"
    tail = TextStream(stop_ids(chat=False), ["o!"])
    assert tail.push(tokens[0]) == "Hell" and tail.finish() == "o" and not tail.stopped
    assert TextStream(stop_ids(chat=False), [""]).push(tokens[0]) == "Hello"  # an empty stop string stops nothing


@pytest.mark.parametrize("stops", [[], ["\n\n", "Question:"]])
def test_each_token_is_decoded_once_and_at_most_the_longest_stop_string_is_held_back(stops):
    enc = CountingEncoding()
    words = "".join(f"word{i} and " for i in range(400))
    tokens = enc.enc.encode_ordinary(words)
    text = TextStream(stop_ids(chat=False), stops, enc=enc)
    longest = max(map(len, stops), default=1)
    for n, token in enumerate(tokens, 1):
        text.push(token)
        decoded = len(enc.enc.decode(tokens[:n]))
        assert decoded - len(text.text) <= longest - 1  # shown as soon as no stop string can start in it
    assert enc.calls == len(tokens)  # one lookup per token, never the whole text again
    text.finish()
    assert text.text == words


def test_long_stop_strings_cost_each_token_its_own_length():
    """Holding back the tail that may start a stop string used to try every prefix of every stop string on every
    token, each one copied: a cost that grew with the square of the stop strings' length (a 1 MiB request body
    held one of ~250,000 characters). Now each stop string's match grows a character at a time (KMP)."""
    enc = CountingEncoding()
    tokens = enc.enc.encode_ordinary("word and " * 300)
    stops = ["word and " * 455 + "x", "a" * 4096, "z" * 4096, "and word and wor" * 256]
    costs = {}
    for name, stop in [("short", ["\n\n"]), ("long", stops)]:
        text = TextStream(stop_ids(chat=False), stop, enc=enc)
        start = time.perf_counter()
        pieces = push_all(text, tokens)
        costs[name] = time.perf_counter() - start
        assert "".join(pieces) + text.finish() == "word and " * 300
    assert costs["long"] < 20 * costs["short"] + 0.05  # was ~1,000 times


def test_stop_strings_that_overlap_themselves():
    enc = load_tokenizer()
    # "abab" held back across tokens while the text keeps half-matching it, then completed
    for text, stops, shown in [
        ("xabababc", ["ababc"], "xab"),
        ("aaaab", ["aab"], "aa"),
        ("abcabd", ["abd", "cab"], "ab"),  # the earliest start wins
        ("abcabx", ["abd"], "abcabx"),
    ]:
        stream = TextStream(stop_ids(chat=False), stops)
        ids = [t for c in text for t in enc.encode_ordinary(c)]  # one character a token
        assert "".join(push_all(stream, ids)) + stream.finish() == shown, (text, stops)
