"""lm-evaluation-harness on an Axiom model in-process: `AxiomLM`, lm-eval's model "axiom" once `register()` ran.

lm-eval builds the prompts and computes the metrics; the model answers its three request types:
- `loglikelihood`: lm-eval's own tokenization split (TemplateLM), then `axiom.eval.tasks.loglikelihoods`, which runs
  each distinct context once into a KV cache and extends it by every continuation;
- `loglikelihood_rolling` (perplexity tasks): lm-eval's rolling windows over the text, scored the same way;
- `generate_until`: KV-cache decoding through `axiom.infer.generate.stream`, stopped at the task's stop strings
  (`axiom.text.stream.TextStream`).

Importing this module imports lm_eval (the `eval` extra); `axiom eval` (axiom/cli/eval.py) imports it only when
--tasks is given.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import yaml
from datasets import config as datasets_config
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import get_session
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from axiom.errors import AxiomError
from axiom.eval.tasks import TASK_BATCH, loglikelihoods
from axiom.infer.generate import stream
from axiom.model.checkpoint import load_model
from axiom.model.transformer import Axiom
from axiom.text.stream import TextStream, stop_ids
from axiom.text.tokenizer import EOS_ID, load_tokenizer

MAX_GEN_TOKS = 256  # lm-eval's default for generation tasks that name no max_gen_toks
OFFLINE_HINT = (
    "offline, evaluate local multiple-choice JSONL with --task-file PATH, or fill the datasets cache on a "
    "connected machine and run with HF_DATASETS_OFFLINE=1 (docs/evaluation.md)"
)
HUB_PROBE_SECONDS = 5  # how long `check_hub` waits for an answer from the Hub
LOCAL_BUILDERS = ("json", "jsonl", "csv", "parquet", "text", "arrow")  # datasets' loaders of local data files


def _positive_int(batch_size: int | str) -> int:
    """lm-eval's batch_size, given as an int or a string of one: at least 1, or one AxiomError."""
    try:
        value = int(batch_size)
    except ValueError:
        value = 0
    if value < 1:
        raise AxiomError(f"AxiomLM: batch_size={batch_size!r} must be a whole number of at least 1, or auto")
    return value


class AxiomLM(TemplateLM):
    """An Axiom model as an lm-eval LM. `lm_eval --model axiom --model_args ckpt=CKPT` works once `register()` ran;
    in-process, pass `AxiomLM(model=...)` to `lm_eval.simple_evaluate`."""

    def __init__(
        self,
        model: Axiom | None = None,
        ckpt: str | None = None,
        device: str = "cpu",
        batch_size: int | str = TASK_BATCH,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        if model is None:
            if ckpt is None:
                raise AxiomError("AxiomLM: pass model= or ckpt=")
            model = load_model(ckpt, device)[0]
        self.model = model.eval()
        self._device = next(model.parameters()).device
        # lm-eval's "auto" / "auto:N" (on its command line and in simple_evaluate) searches for the largest batch
        # that fits; the scorer's own default fits, as its logits are taken in chunks
        self.batch_size = TASK_BATCH if str(batch_size).startswith("auto") else _positive_int(batch_size)
        self.dtype = dtype  # autocast dtype on CUDA, as in training's evaluation
        self.enc = load_tokenizer()

    @property
    def eot_token_id(self) -> int:
        return EOS_ID

    @property
    def prefix_token_id(self) -> int:
        return EOS_ID  # no BOS: an empty context is conditioned on EOS, as documents follow one in training

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return "cl100k_base"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.enc.encode_ordinary(string)  # as `axiom prepare` encodes training text

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings or None, context ids, continuation ids)."""
        pairs = [(context, continuation) for _, context, continuation in requests]
        answers = loglikelihoods(self.model, pairs, self.batch_size, self.dtype)
        for (strings, _, _), answer in zip(requests, answers, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, over lm-eval's disjoint windows of at most max_length tokens."""
        owners, windows = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                owners.append(i)
                windows.append(make_disjoint_window(window))
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owners, loglikelihoods(self.model, windows, self.batch_size, self.dtype), strict=True):
            totals[i] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) continuations, cut at the first stop string or EOS."""
        out = [""] * len(requests)
        by_kwargs = defaultdict(list)  # one decoding setting per batch
        for i, req in enumerate(requests):
            by_kwargs[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        for indices in by_kwargs.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.enc.decode([EOS_ID]))
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise AxiomError(f"generate_until: max_gen_toks={max_new} leaves no room in {self.max_length} tokens")
            sampling = {"temperature": kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0}
            sampling |= {k: kwargs[k] for k in ("top_k", "top_p") if kwargs.get(k) is not None}
            for s in range(0, len(indices), self.batch_size):
                batch = indices[s : s + self.batch_size]
                prompts = [
                    self.tok_encode(requests[i].args[0])[-(self.max_length - max_new) :] or [EOS_ID] for i in batch
                ]
                for i, text in zip(batch, self._generate(prompts, max_new, until, sampling), strict=True):
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _generate(self, prompts: list[list[int]], max_new: int, until: list[str], sampling: dict) -> list[str]:
        """Decode until every row has produced a stop string (or EOS) or `max_new` tokens."""
        texts = [TextStream(stop_ids(chat=False), until, self.enc) for _ in prompts]
        for step in stream(self.model, prompts, max_new, eos_id=EOS_ID, **sampling):
            for text, token in zip(texts, step.tolist(), strict=True):
                text.push(token)
            if all(text.stopped for text in texts):
                break
        for text in texts:
            text.finish()
        return [text.text for text in texts]


def register() -> None:
    """Name `AxiomLM` "axiom" in lm-eval's model registry (registering the same class again is a no-op)."""
    register_model("axiom")(AxiomLM)


def run_tasks(
    model: Axiom,
    tasks: list[str | dict],
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = TASK_BATCH,
    dtype: str = "float32",
    task_manager: TaskManager | None = None,
) -> dict:
    """lm-eval's `simple_evaluate` on `model` for the named tasks (or inline task configs): its results dict
    ("results", "n-samples", ...).

    Task data comes from the Hugging Face Hub through `datasets` (or its cache); when it cannot be fetched the
    error says so and names the offline options."""
    names = task_names(tasks)
    check_hub(tasks)
    register()
    try:
        return simple_evaluate(
            model=AxiomLM(model, batch_size=batch_size, dtype=dtype),
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            log_samples=False,
        )
    except ConnectionError as e:  # datasets: "Couldn't reach 'Rowan/hellaswag' on the Hub (...)"
        raise AxiomError(
            f"--tasks {names}: the task data could not be fetched from the Hugging Face Hub ({e}); {OFFLINE_HINT}"
        ) from None
    except KeyError as e:  # lm-eval: "Spec 'x' is not a registered task/group/tag name or valid YAML path"
        raise AxiomError(f"--tasks {names}: {e.args[0] if e.args else e}") from None
    except ValueError as e:  # random.sample, drawing the few-shot examples
        if num_fewshot is None or "larger than population" not in str(e):
            raise
        raise AxiomError(
            f"--num-fewshot {num_fewshot}: a task of {names} has fewer examples to draw the shots from; ask for fewer"
        ) from None


def task_names(tasks: list[str | dict]) -> str:
    """The tasks as `--tasks` names them, for messages."""
    return ",".join(t if isinstance(t, str) else str(t.get("task")) for t in tasks)


def needs_hub(task: str | dict) -> bool:
    """Whether a task's data may have to come from the Hugging Face Hub: a named task (lm-eval's own tasks load
    theirs from it), or an inline config whose dataset is not a local folder or local data files."""
    if isinstance(task, str):
        if not (task.endswith((".yaml", ".yml")) and Path(task).is_file()):
            return True
        try:  # a task's YAML file: its dataset decides, as an inline config's
            task = yaml.safe_load(Path(task).read_text(encoding="utf-8"))
        except (yaml.YAMLError, OSError, UnicodeDecodeError):  # lm-eval's own tags (!function) included: ask
            return True
        if not isinstance(task, dict):
            return True
    path = str(task.get("dataset_path", ""))
    return path not in LOCAL_BUILDERS and not Path(path).exists()


def check_hub(tasks: list[str | dict]) -> None:
    """Fail within HUB_PROBE_SECONDS, in one line, when the tasks need the Hugging Face Hub and it does not answer.

    Unreachable, the Hub client retries every file for half a minute or more before datasets looks in its cache.
    In offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) nothing is asked: datasets reads its cache at once and
    fails fast itself when the data is not there."""
    if datasets_config.HF_HUB_OFFLINE or not any(needs_hub(t) for t in tasks):
        return
    endpoint = hub_constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=HUB_PROBE_SECONDS)
    except Exception as e:  # requests' or httpx's errors, by huggingface_hub version: no answer at all
        raise AxiomError(
            f"--tasks {task_names(tasks)}: the task data could not be fetched from the Hugging Face Hub ({endpoint} "
            f"does not answer: {type(e).__name__}); {OFFLINE_HINT}"
        ) from None


def json_task(name: str, path: str | Path, fields: tuple[str, str, str] = ("context", "choices", "answer")) -> dict:
    """An inline lm-eval task config (pass it in `tasks`) for a local multiple-choice JSONL in the generic format,
    or another whose fields are named: lm-eval's own requests and metrics on a task file (scripts/bench_tasks.py
    compares the native scorer with it)."""
    context, choices, answer = fields
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": f"{{{{{context}}}}}",
        "doc_to_choice": f"{{{{{choices}}}}}",
        "doc_to_target": f"{{{{{answer}}}}}",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }
