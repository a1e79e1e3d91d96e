"""The OpenAI API's shapes for `axiom serve`: checking a request into a `Spec`, errors, and the JSON of answers.

Requests are checked by hand rather than through pydantic models, so that every error has OpenAI's shape and
status: {"error": {"message", "type", "param", "code"}}, 400 naming the bad field, 404 for an unknown model.
Nothing here decodes or touches HTTP; axiom/infer/serve.py does.
"""

from __future__ import annotations

from dataclasses import dataclass

from axiom.infer.engine import SamplingParams
from axiom.text.chatml import TEMPLATE_NAME, encode_chat
from axiom.text.stream import stop_ids
from axiom.text.tokenizer import load_tokenizer

UNSUPPORTED = ("echo", "logprobs", "suffix", "tools", "functions")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = "invalid_request_error" if status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedModel:
    """What request checking needs to know of the model: the id clients send, its context, whether it is chat-tuned."""

    name: str
    context: int
    chat: bool


@dataclass
class Spec:
    """A checked request: what to decode and how to answer."""

    prompt: list[int]
    params: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool


def _field(body: dict, name: str, kinds: tuple[type, ...], default=None, what: str = ""):
    """body[name] if it has one of `kinds` (bool is not a number here), `default` if absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"{name}: expected {what or ' or '.join(k.__name__ for k in kinds)}", param=name)
    return value


def check_request(body: dict, model: ServedModel, chat: bool) -> Spec:
    """Check `body` of /v1/completions (`chat` False) or /v1/chat/completions; ApiError (400/404) naming the bad
    field. The fields are checked in a fixed order, so that a request with several faults always gets one answer."""
    _check_model(body, model)
    prompt, max_tokens = _chat_prompt(body, model) if chat else _completion_prompt(body)
    _check_length(body, prompt, max_tokens, model.context, chat)
    params = _sampling(body, max_tokens, model.context - len(prompt), stop_ids(chat))
    stop = _field(body, "stop", (str, list), default=[], what="a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop: expected up to 4 non-empty strings", param="stop")
    options = _field(body, "stream_options", (dict,), default={})
    return Spec(
        prompt,
        params,
        stop,
        stream=_field(body, "stream", (bool,), default=False),
        include_usage=_field(options, "include_usage", (bool,), default=False),
    )


def _check_model(body: dict, model: ServedModel) -> None:
    name = _field(body, "model", (str,))
    if name is None:
        raise ApiError(400, "model: required; GET /v1/models lists it", param="model")
    if name != model.name:
        message = f"the model {name!r} does not exist; this server has {model.name!r}"
        raise ApiError(404, message, "model", "model_not_found")


def _check_length(body: dict, prompt: list[int], max_tokens: int | None, context: int, chat: bool) -> None:
    """The prompt leaves room for a token; max_tokens, when given, asks for at least one."""
    if len(prompt) >= context:
        raise ApiError(
            400,
            f"this model's context is {context} tokens and the prompt has {len(prompt)}; a prompt must "
            "leave room for at least one new token",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
    if max_tokens is not None and max_tokens <= 0:
        name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        raise ApiError(400, f"{name}: must be at least 1, not {max_tokens}", param=name)


def _sampling(body: dict, max_tokens: int | None, room: int, stop: tuple[int, ...]) -> SamplingParams:
    """The request's sampling parameters; max_tokens (None: all the room there is) is capped by the context, where
    the answer ends with finish_reason "length"."""
    if _field(body, "n", (int,), default=1) != 1:
        raise ApiError(400, "n: only 1 choice per request is supported", param="n")
    for unsupported in UNSUPPORTED:
        if body.get(unsupported) not in (None, False, 0, []):
            raise ApiError(400, f"{unsupported}: not supported by axiom serve", param=unsupported)
    params = SamplingParams(
        max_new_tokens=min(max_tokens or room, room),
        temperature=float(_field(body, "temperature", (int, float), default=1.0, what="a number")),
        top_p=_field(body, "top_p", (int, float), what="a number"),
        top_k=_field(body, "top_k", (int,)),
        seed=_field(body, "seed", (int,)),
        stop_ids=stop,
    )
    if params.seed is not None and not -(2**63) <= params.seed < 2**64:
        raise ApiError(400, "seed: must fit in 64 bits", param="seed")
    problem = params.problem()
    if problem:
        name = {"max_new_tokens": "max_tokens"}.get(problem[0], problem[0])
        raise ApiError(400, f"{name}: {problem[1]}, not {getattr(params, problem[0])}", param=name)
    return params


def _completion_prompt(body: dict) -> tuple[list[int], int | None]:
    """The ids of `prompt` (a string, a batch of one string, or token ids) and max_tokens (OpenAI's default 16)."""
    enc = load_tokenizer()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = enc.encode_ordinary(prompt) if prompt else [enc.eot_token]  # as `axiom generate` does
    elif isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < enc.n_vocab for t in prompt):
        ids = prompt
    else:
        message = "prompt: expected a string or a non-empty list of token ids (one prompt per request)"
        raise ApiError(400, message, "prompt")
    return ids, _field(body, "max_tokens", (int,), default=16)


def _chat_prompt(body: dict, model: ServedModel) -> tuple[list[int], int | None]:
    """The ChatML prompt of `messages`, for a checkpoint trained with that template (contract 1), and
    max_completion_tokens (or the older max_tokens; None: no limit but the context)."""
    if not model.chat:
        raise ApiError(
            400,
            f'this model has no chat template (its config.json lacks "chat_template": "{TEMPLATE_NAME}"); '
            "use /v1/completions with a plain prompt",
            "messages",
            "no_chat_template",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ApiError(400, f"messages[{i}]: expected {{'role': string, 'content': string}}", "messages")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        ids = list(encode_chat(messages, add_generation_prompt=True).ids)
    except ValueError as e:  # e.g. a role the template does not know
        raise ApiError(400, f"messages: {e}", "messages") from None
    max_tokens = _field(body, "max_completion_tokens", (int,))
    return ids, _field(body, "max_tokens", (int,)) if max_tokens is None else max_tokens


# ---- answers


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(head: dict, text: str, reason: str | None, counts: dict, chat: bool) -> dict:
    """A whole answer: `head` (id, created, model), the one choice and its usage."""
    if chat:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": counts}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return {**head, "object": "text_completion", "choices": [choice], "usage": counts}


def chunk(head: dict, piece: str, reason: str | None, chat: bool, role: bool = False) -> dict:
    """One event of a streamed answer; a chat stream's first event (`role`) names the assistant."""
    if chat:
        delta = ({"role": "assistant"} if role else {}) | ({"content": piece} if piece or role else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}
    return {**head, "object": _chunk_object(chat), "choices": [choice]}


def usage_chunk(head: dict, counts: dict, chat: bool) -> dict:
    """The last event of a stream that asked for usage (stream_options.include_usage)."""
    return {**head, "object": _chunk_object(chat), "choices": [], "usage": counts}


def _chunk_object(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"
