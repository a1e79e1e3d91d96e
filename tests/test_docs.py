"""The docs cannot drift from the code: every command block of README.md and docs/*.md, and every example at the end of
`axiom COMMAND --help`, runs verbatim with bash in a checkout that looks like a user's after `make demo` and
`make demo-chat` (tests/docs_helpers.py). Each command must exit 0, and what the docs say a command prints or
writes is checked (EXPECTED). A block that cannot run here carries `<!-- not run by tests: REASON -->` on the line
above it, and the reason is required. `make test` itself is never run from here (it runs these tests).

Each document runs in a checkout of its own, its blocks in order (a block may use what an earlier one wrote), and
the --help examples of each command (which need nothing but the demos' files) in one more.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from docs_helpers import (
    Block,
    DocRun,
    Result,
    command_blocks,
    command_env,
    documents,
    make_checkout,
    needs_shared,
    port_is_free,
    server_of,
    words,
)

from axiom.cli import COMMANDS, EXAMPLES, examples, main

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BLOCKS = command_blocks(REPO)
# A block with one of these commands took more than ~17 s on the 2-core VM (its whole block, quiet machine).
SLOW = ("lm_eval", "eval_tasks=", "axiom import --hf", "llama-bench")
# The demos with fewer steps (10 instead of 320, then 10 fine-tuning steps instead of 1,500), through their own code:
# the same folders and files as `make demo` and `make demo-chat` write, in well under a minute.
SHORT_DEMOS = (
    "import axiom.cli.demo_chat as chat; chat.SFT_SETTINGS = (*chat.SFT_SETTINGS, 'max_steps=10'); "
    "from axiom.cli.demo import main; main(['--out', 'runs/demo', '--set', 'max_steps=10', '--chat'])"
)
DEMO_PATH = re.compile(r"runs/demo(?:/[\w.-]+)*")


@dataclass(frozen=True)
class Expect:
    prints: tuple[str, ...] = ()  # patterns the command's output must match
    writes: tuple[tuple[str, str], ...] = ()  # (path, a pattern its text must match, or "" for any file or folder)

    def check(self, result: Result, checkout: Path) -> None:
        for pattern in self.prints:
            assert re.search(pattern, result.output), f"{pattern!r} not printed by:\n{result.report()}"
        for path, pattern in self.writes:
            assert (checkout / path).exists(), f"{path} not written by:\n{result.report()}"
            if pattern:
                assert re.search(pattern, (checkout / path).read_text()), f"{path} does not match {pattern!r}"


# What the docs say a command prints or writes: (document, the command as the document writes it) -> the check.
EXPECTED = {
    ("README.md", "axiom eval --ckpt runs/demo/run/checkpoints/best --data runs/demo/data"): Expect(
        prints=(r"runs/demo/run/checkpoints/best \(step \d+\): val loss \d+\.\d{4}, ppl [\d.]+, bpb \d+\.\d{4}",)
    ),
    ("docs/data.md", "axiom prepare ../shared/data/english-mix --out data/mix --workers 2 --val-fraction 0.05"): Expect(
        prints=(r"train\s+568 docs", r"val\s+28 docs"), writes=(("data/mix/manifest.json", '"val_docs": 28'),)
    ),
    ("docs/evaluation.md", "python scripts/make_choices.py --data runs/demo/data --out runs/demo/kjv_choices.jsonl"): (
        Expect(prints=("433 items from 19 held-out documents",))
    ),
    (
        "docs/evaluation.md",
        "axiom eval --ckpt runs/demo/run/checkpoints/best --task-file runs/demo/kjv_choices.jsonl "
        "--data runs/demo/data",
    ): Expect(
        prints=(
            r"runs/demo/run/checkpoints/best \(step \d+\): val loss \d+\.\d{4}",
            r"task\s+n\s+acc\s+acc_norm\n",
            r"kjv_choices \(file\)  433  0\.\d{4} ± 0\.\d{4}  0\.\d{4} ± 0\.\d{4}",
        )
    ),
    (
        "docs/evaluation.md",
        "axiom train --preset tiny --data runs/demo/data --out runs/tiny-tasks "
        "--set eval_tasks=runs/demo/kjv_100.jsonl --set max_steps=10 --set warmup_steps=2",
    ): Expect(writes=(("runs/tiny-tasks/eval.csv", r"kjv_100_acc,kjv_100_acc_norm"),)),
    ("docs/interop.md", "axiom import --hf hf/axiom-tiny-llama --out ckpt/imported"): Expect(
        writes=(("ckpt/imported/model.safetensors", ""), ("hf/axiom-tiny/modeling_axiom.py", ""))
    ),
    (
        "docs/interop.md",
        "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf "
        "--model_args pretrained=hf/axiom-tiny,trust_remote_code=True,dtype=float32 "
        "--tasks kjv_100 --include_path tasks --device cpu --batch_size 16 --limit 20 "
        "--log_samples --output_path results",
    ): Expect(prints=(r"\|kjv_100\|.*\|acc ", r"\|acc_norm\|")),
    ("docs/interop.md", 'llama-tokenize -m axiom-tiny-f32.gguf -p "Hello world" --ids'): Expect(
        prints=(r"\[9906, 1917\]",)  # tiktoken's cl100k_base ids of "Hello world"
    ),
    ("docs/interop.md", "axiom serve --ckpt runs/demo/run/checkpoints/best"): Expect(
        prints=(r"axiom serve: run-best on http://127\.0\.0\.1:8000/v1",)
    ),
}


def cannot_run(block: Block) -> str | None:
    """Why the block does not run here (its marker's reason, or what this machine lacks); None when it runs."""
    if block.not_run is not None:
        return block.not_run
    if not SHARED.is_dir() and any(needs_shared(c) for c in block.commands):
        return f"needs ../shared beside the repository (its data and llama.cpp's programs), absent: {SHARED}"
    for command in block.commands:
        if (server := server_of(command)) and not port_is_free(server[1]):
            return f"port {server[1]} is in use: {command}"
    return None


def runnable(block: Block) -> bool:
    return cannot_run(block) is None


def expected(doc: str, command: str) -> Expect | None:
    return next((e for (d, c), e in EXPECTED.items() if d == doc and words(c) == words(command)), None)


def check_results(block: Block, results: list[Result], checkout: Path) -> None:
    """Every command of the block ran and exited 0, and printed or wrote what EXPECTED says."""
    for result in results:
        assert result.returncode == 0, f"{block.id}: a command failed\n{result.report()}"
    assert len(results) == len(block.commands), f"{block.id}: did not run"
    for result in results:
        if expect := expected(block.doc, result.command):
            expect.check(result, checkout)


def outputs(command: str) -> set[str]:
    args = words(command)
    return {value for flag, value in zip(args, args[1:], strict=False) if flag == "--out"}


def needs_only(command: str, demo_checkout: Path, made: set[str]) -> bool:
    """Whether every path the command reads exists after the demos alone or is in `made`."""
    reads = [arg for arg in words(command) if "/" in arg and arg not in outputs(command)]
    return all(arg in made or (demo_checkout / arg).exists() for arg in reads)


def ran_in_the_docs(command: str, doc_runs: Callable[[str], DocRun]) -> Result | None:
    """The result of the same command in a document's checkout, running the document up to it; None if none has it."""
    for block in filter(runnable, BLOCKS):
        if any(words(c) == words(command) for c in block.commands):
            run = doc_runs(block.doc)
            results = run.through(run.blocks.index(block), runnable)
            return next((r for r in results if words(r.command) == words(command)), None)
    return None


def covered_by_the_docs(lines: tuple[str, ...], doc_runs, demo_checkout: Path) -> list[Result] | None:
    """The docs' results of the same commands when each needs only the demos' files and what the examples before it
    write (then the docs ran it in the same state); else None."""
    made: set[str] = set()
    for line in lines:
        if not needs_only(line, demo_checkout, made):
            return None
        made |= outputs(line)
    results = [ran_in_the_docs(line, doc_runs) for line in lines]
    return None if None in results else results


def help_blocks() -> list[Block]:
    """The examples of each command as one block, "at line" i for the i-th command."""
    return [Block("axiom --help", i, lines, None) for i, lines in enumerate(EXAMPLES.values())]


def block_param(block: Block):
    slow = any(s in c for s in SLOW for c in block.commands)
    return pytest.param(block, id=block.id, marks=[pytest.mark.slow] if slow else [])


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory) -> Path:
    """runs/ of a checkout after `make demo` and `make demo-chat` (SHORT_DEMOS)."""
    checkout = make_checkout(REPO, tmp_path_factory.mktemp("demo") / "repo")
    done = subprocess.run(
        [sys.executable, "-c", SHORT_DEMOS],
        cwd=checkout,
        env=command_env(REPO),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return checkout / "runs"


@pytest.fixture(scope="session")
def doc_runs(demo_runs, tmp_path_factory) -> Callable[[str], DocRun]:
    """The DocRun of a document (or of "axiom --help"), made on first use: a checkout with a copy of demo_runs."""
    made: dict[str, DocRun] = {}

    def get(doc: str) -> DocRun:
        if doc not in made:
            checkout = make_checkout(REPO, tmp_path_factory.mktemp("checkout") / "repo", runs=demo_runs)
            blocks = help_blocks() if doc == "axiom --help" else [b for b in BLOCKS if b.doc == doc]
            made[doc] = DocRun(blocks, checkout, command_env(REPO))
        return made[doc]

    return get


@pytest.mark.parametrize("block", [block_param(b) for b in BLOCKS])
def test_command_block_runs_verbatim(block, request):
    if block.not_run is not None:
        assert block.not_run, f"{block.id}: the marker above the block gives no reason"
    if reason := cannot_run(block):
        pytest.skip(reason)
    run = request.getfixturevalue("doc_runs")(block.doc)
    results = run.through(run.blocks.index(block), runnable)
    check_results(block, results, run.checkout)


def test_every_expectation_names_a_command_that_runs():
    commands = {(b.doc, tuple(words(c))) for b in BLOCKS if b.not_run is None for c in b.commands}
    stale = [(doc, command) for doc, command in EXPECTED if (doc, tuple(words(command))) not in commands]
    assert not stale, f"EXPECTED names commands that no runnable block of its document has: {stale}"


@pytest.mark.parametrize("doc", [str(p.relative_to(REPO)) for p in documents(REPO)])
def test_demo_paths_named_in_the_docs_exist(doc, doc_runs):
    """Every runs/demo/... path a page names exists after the demos and the page's own commands."""
    run = doc_runs(doc)
    for i, block in enumerate(run.blocks):
        if runnable(block):
            run.block(i)
    named = {path.rstrip(".") for path in DEMO_PATH.findall((REPO / doc).read_text())}
    assert not sorted(p for p in named if not (run.checkout / p).exists())


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_ends_with_examples(name, capsys):
    assert 1 <= len(EXAMPLES[name]) <= 3 and set(EXAMPLES) == set(COMMANDS)
    with pytest.raises(SystemExit):
        main([name, "--help"])
    assert capsys.readouterr().out.endswith(f"\n\n{examples(name)}\n")


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_help_examples_run_verbatim(name, doc_runs, demo_runs):
    """A command's examples run in order in the --help checkout, unless the docs ran the same commands in the same
    state (covered_by_the_docs)."""
    run = doc_runs("axiom --help")
    block = run.blocks[list(EXAMPLES).index(name)]
    if results := covered_by_the_docs(block.commands, doc_runs, demo_runs.parent):
        check_results(block, results, demo_runs.parent)
        return
    if reason := cannot_run(block):
        pytest.skip(reason)
    check_results(block, run.block(block.line), run.checkout)


def layout_entries(readme: str) -> set[str]:
    """The paths README.md's Layout tree lists: a name indented two spaces per folder below the last folder above
    it, then its description; several names may share a line (cli/'s commands); deeper lines continue a
    description."""
    tree = readme.split("\n## Layout\n", 1)[1].split("```")[1]
    listed: set[str] = set()
    folders: list[str] = []
    for line in tree.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        if not line.strip() or depth > len(folders):  # a description's next line
            continue
        del folders[depth:]
        names = []
        for word in line.strip().split("  ")[0].split(" "):  # the names, up to the description or a folder's
            if not re.fullmatch(r"[\w.-]+(/|\.\w+)", word):
                break
            names.append(word)
            if word.endswith("/"):
                folders.append(word)
                break
        listed.update("".join([*folders[:depth], name]) for name in names)
    return listed


def test_the_readme_layout_names_every_module():
    """The README's tree has one line per module of the library, __init__ and __main__ aside (axiom/torchrun.py
    was left out); a folder it describes in one line (interop/hf/) covers what is inside it."""
    listed = layout_entries((REPO / "README.md").read_text())
    summarised = [f for f in listed if f.endswith("/") and not any(p != f and p.startswith(f) for p in listed)]
    modules = {str(p.relative_to(REPO)) for p in (REPO / "axiom").rglob("*.py") if not p.name.startswith("__")}
    assert sorted(m for m in modules if m not in listed and not m.startswith(tuple(summarised))) == []
