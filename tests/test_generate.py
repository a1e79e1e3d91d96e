"""`axiom generate` on bad values: one line naming the flag, exit 2, nothing decoded; a cap by the context is said."""

import pytest
import torch
from conftest import save_model, when_the_reader_leaves
from decode_helpers import BREAKING, scripted_chat_checkpoint, text_or_one_line

from axiom.cli import build_parser, main
from axiom.cli.args import eager_decoding
from axiom.config import Config, ModelConfig, TrainConfig
from axiom.infer.engine import Engine, SamplingParams
from axiom.model.transformer import Axiom
from axiom.text.tokenizer import load_tokenizer

TINY = ["generate", "--preset", "tiny", "--set", "max_seq_len=16", "--temperature", "0"]
ONE_LAYER = ["--set", "n_layers=1", "--set", "d_model=32", "--set", "n_heads=2", "--set", "n_kv_heads=1"]
COMPILED = "decoding path: compiled (static cache; CUDA graphs on a GPU)"
NOISE = "notice: no --ckpt: sampling from randomly initialised tiny weights; the text is noise\n"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
        (["--max-new-tokens", "-1"], "--max-new-tokens -1: must be at least 1"),
        (["--top-p", "0"], "--top-p 0.0: must lie in (0, 1]"),
        (["--top-p", "2"], "--top-p 2.0: must lie in (0, 1]"),
        (["--top-k", "-5"], "--top-k -5: must be at least 1, or 0 or -1 for none"),
        (["--temperature", "nan"], "--temperature nan: must be 0 (greedy) or positive"),
        (["--temperature", "-1"], "--temperature -1.0: must be 0 (greedy) or positive"),
        (
            ["--prompt", " ".join(["word"] * 16)],
            "--prompt: 16 tokens, but the model's context is 16 tokens",
        ),
    ],
)
def test_bad_values_are_one_line_and_exit_2(flags, message, capsys):
    assert main([*TINY, *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"axiom generate: error: {message}")


def test_a_cap_by_the_context_is_said(capsys):
    assert main([*TINY, "--prompt", "one two three four five six seven eight nine ten", "--max-new-tokens", "50"]) == 0
    out, err = capsys.readouterr()
    assert err == (
        "axiom generate: note: --max-new-tokens 50 capped to 6: the prompt (10 tokens) and its new tokens fill the "
        "context of 16\n" + NOISE
    )
    assert out.startswith("one two three four five six seven eight nine ten")


def test_bfloat16_decoding(capsys):
    assert main([*TINY, "--prompt", "Hello", "--max-new-tokens", "4", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys):
    assert main([*TINY, "--prompt", "Hello", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("axiom generate: error: --device cuda") and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["generate"],
        ["chat", "--ckpt", "c"],
        ["serve", "--ckpt", "c"],
        ["bench", "generate"],
    ],
)
def test_every_decoding_dtype_flag_takes_both_spellings(argv):
    """torch's names and llama.cpp's mean the same everywhere (axiom.dtypes): the library gets torch's."""
    parser = build_parser()
    for spelling, name in [("f32", "float32"), ("bfloat16", "bfloat16"), ("bf16", "bfloat16"), ("q8_0", "int8")]:
        assert parser.parse_args([*argv, "--dtype", spelling]).dtype == name


@pytest.mark.parametrize(
    "argv", [["generate"], ["chat", "--ckpt", "c"], ["serve", "--ckpt", "c"], ["export"], ["bench", "generate"]]
)
def test_dtype_help_lists_both_spellings_the_same_way(argv, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--dtype DTYPE weights" in help_text
    assert "float32 (f32)" in help_text and "bfloat16 (bf16)" in help_text and "int8 (q8_0)" in help_text


def test_llama_cpp_spellings_decode_as_torchs(capsys):
    outputs = []
    for dtype in ("int8", "q8_0"):
        assert main([*TINY, "--prompt", "Hello", "--max-new-tokens", "4", "--dtype", dtype]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("Hello")
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--dtype", "f16"])
    last = capsys.readouterr().err.splitlines()[-1].replace("'", "")  # Python 3.14 leaves the choices unquoted
    assert e.value.code == 2 and last.endswith(
        "argument --dtype: invalid choice: f16 (choose from float32, f32, bfloat16, bf16, int8, q8_0)"
    )


def test_sampling_random_weights_is_said_once_a_checkpoint_is_not(tmp_path, capsys):
    assert main([*TINY, "--prompt", "Hello", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().err == NOISE
    assert main([*TINY, "--prompt", "word " * 20]) == 2  # refused once the model is known: one line, no notice
    assert capsys.readouterr().err.startswith("axiom generate: error: ")
    small = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_multiple_of=32, max_seq_len=16)
    save_model(Axiom(small), Config(small, TrainConfig()), tmp_path)
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "Hello", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().err == ""


def test_a_chat_tuned_models_text_ends_at_the_end_of_its_turn(tmp_path, capsys):
    """As its export, GGUF and axiom serve end it: the text ran on through <|im_end|> and <|im_start|>, shown as
    U+FFFD."""
    import axiom.text.chatml as chat

    enc = load_tokenizer()
    hi, there, user = (enc.encode_ordinary(t)[0] for t in ("Hi", " there", "user"))
    ckpt = scripted_chat_checkpoint(tmp_path / "ckpt", {hi: there, there: chat.IM_END, chat.IM_END: user, user: hi})
    args = ["generate", "--ckpt", str(ckpt), "--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "8"]
    assert main(args) == 0
    assert capsys.readouterr().out == "Hi there\n"
    assert main([*args, "--prompt", "Hi"]) == 0  # a batch: every row ended
    assert capsys.readouterr().out == "--- sample 0\nHi there\n--- sample 1\nHi there\n"


def test_a_prompt_beyond_the_models_vocabulary_is_one_line(tmp_path, capsys):
    """A model of another vocabulary (an imported 32,000-id Llama): its prefill failed with an IndexError."""
    small = ModelConfig(vocab_size=1000, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_multiple_of=32)
    save_model(Axiom(small), Config(small, TrainConfig()), tmp_path)
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "Hello world", "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err == (
        "axiom generate: error: --prompt: token id 9,906 is outside the model's vocab_size 1,000: use a model with "
        "cl100k_base's 100,277 ids\n"
    )
    engine = Engine(Axiom(small), max_batch=1)
    with pytest.raises(ValueError, match="token id 9,906 is outside the model's vocab_size 1,000: use a model with"):
        engine.submit([9906, 1917], SamplingParams())
    assert not engine.has_work()


@pytest.mark.parametrize("flags", BREAKING, ids=" ".join)
def test_values_that_break_the_maths_give_text_or_one_line(flags, capsys):
    code = main([*TINY, "--prompt", "Hello", "--max-new-tokens", "3", *flags])
    text_or_one_line(code, *capsys.readouterr(), "generate", flags[0])


def test_a_batch_whose_last_seed_breaks_the_maths_is_one_line(capsys):
    """Prompt i samples with seed + i: --seed at the top of the range is fine for one prompt, not for two."""
    top = 2**64 - 1
    assert main([*TINY, "--prompt", "a", "--prompt", "b", "--max-new-tokens", "2", "--seed", str(top)]) == 2
    assert capsys.readouterr().err.startswith(
        f"axiom generate: error: --seed {top}: prompt 1 samples with seed + 1 = {top + 1}, which "
    )
    assert main([*TINY, "--prompt", "a", "--max-new-tokens", "2", "--seed", str(top)]) == 0
    capsys.readouterr()
    assert main([*TINY, "--prompt", "a", "--seed", str(2**70)]) == 2
    assert (
        capsys.readouterr().err == f"axiom generate: error: --seed {2**70}: must fit in 64 bits (-2**63 to 2**64 - 1)\n"
    )


@pytest.mark.parametrize(
    "command", [["generate"], ["chat", "--ckpt", "c"], ["serve", "--ckpt", "c"], ["bench", "generate"]]
)
def test_decoding_is_compiled_on_cuda_and_eager_on_cpu_unless_told(command, capsys):
    parser = build_parser()
    for flags, on_cpu, on_cuda in [([], True, False), (["--eager"], True, True), (["--compile"], False, False)]:
        args = parser.parse_args([*command, *flags])
        assert eager_decoding(args, torch.device("cpu")) is on_cpu
        assert eager_decoding(args, torch.device("cuda")) is on_cuda
    with pytest.raises(SystemExit) as e:
        main([*command, "--eager", "--compile"])
    assert e.value.code == 2 and "argument --compile: not allowed with argument --eager" in capsys.readouterr().err


def test_generate_compiles_where_the_device_defaults_to_it_and_says_so(monkeypatch, capsys):
    """A CUDA device's default, simulated on the CPU: `stream` is told to compile and stderr says so."""
    calls = []

    def fake_stream(model, prompts, max_new_tokens, **kwargs):
        calls.append(kwargs["compile"])
        yield torch.tensor([0] * len(prompts))

    monkeypatch.setattr("axiom.cli.args.default_eager", lambda device: False)
    monkeypatch.setattr("axiom.cli.generate.stream", fake_stream)
    assert main([*TINY, "--prompt", "Hello", "--max-new-tokens", "1"]) == 0
    assert main([*TINY, "--prompt", "Hello", "--max-new-tokens", "1", "--eager"]) == 0
    assert calls == [True, False]
    assert capsys.readouterr().err.count(f"axiom generate: {COMPILED}; its first run on this machine compiles") == 1


@pytest.mark.slow
def test_compile_on_the_cpu_gives_the_eager_defaults_text(capsys, fresh_compiler):
    pytest.importorskip("torch._inductor")
    args = [*TINY, *ONE_LAYER, "--prompt", "Hello", "--prompt", "And God said", "--max-new-tokens", "4"]
    assert main(args) == 0
    eager = capsys.readouterr()
    assert main([*args, "--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out and "--- sample 1\nAnd God said" in eager.out
    assert COMPILED not in eager.err and COMPILED in compiled.err


def test_a_closed_pipe_and_bytes_the_locale_cannot_take_end_quietly(tmp_path):
    """`axiom generate ... | head -c 5`: exit 141 without a BrokenPipeError traceback; under a strict UTF-8 locale a
    Latin-1 byte in --prompt (a surrogate in Python's argv) is shown replaced, not a UnicodeEncodeError."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "axiom.cli", "generate", "--max-new-tokens", "40", "--temperature", "0", "--prompt"]
    status, err, head = when_the_reader_leaves([*cmd, "Hello"], 5, env)
    assert (status, head) == (141, b"Hello") and "Traceback" not in err, err
    done = subprocess.run([*cmd, b"caf\xe9"], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(b"caf?") and b"Traceback" not in done.stderr
