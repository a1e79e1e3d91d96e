"""The OpenAI API's shapes for `axiom serve`: checking a request into a `Spec`, errors, and the JSON of answers.

Requests are checked by hand rather than through pydantic models, so that every error has OpenAI's shape and
status: {"error": {"message", "type", "param", "code"}}, 400 naming the bad field, 404 for an unknown model.
Nothing here decodes or touches HTTP; axiom/infer/serve.py does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from axiom.infer.engine import SamplingParams
from axiom.text.chatml import TEMPLATE_NAME, encode_chat
from axiom.text.stream import stop_ids
from axiom.text.tokenizer import load_tokenizer

# What one request may hold (docs/interop.md, "Limits"). Stop strings are matched as text is decoded; the body
# is read, parsed and tokenized before any check can refuse it.
MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0  # a request body arrives whole within this many seconds, or is refused (408)
# A request's head (request line and headers) arrives whole within this many seconds of its connection opening or of
# the previous response on it, or the connection is closed: an idle or trickling client would hold one of the
# server's connections for ever.
HEAD_TIMEOUT_S = 30.0
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_INT_DIGITS = 32  # 2**64, the largest seed, has 20
MIN_TOKENS_PER_MESSAGE = 4  # <|im_start|>, role and content (at least one token), <|im_end|>, "\n"

# The fields each endpoint reads. "user", and for chat "metadata", "store", "service_tier" and
# "parallel_tool_calls", change nothing in the answer: accepted, as OpenAI's clients send them.
COMMON_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options")
COMPLETION_FIELDS = frozenset({*COMMON_FIELDS, "prompt", "user"})
CHAT_FIELDS = frozenset(
    {*COMMON_FIELDS, "messages", "max_completion_tokens", "user", "metadata", "store", "service_tier"}
    | {"parallel_tool_calls"}
)
# Fields that would change the answer, which axiom serve does not implement: refused unless they hold a value
# that changes nothing (null always does).
NEUTRAL = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "repetition_penalty": (1,),
    "min_p": (0,),
    "min_tokens": (0,),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "modalities": (["text"],),
}


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


def check_content_type(value: str | None) -> None:
    """A body is JSON: Content-Type application/json (or a +json type), or none at all; 415 for anything else,
    such as the form encoding `curl -d` sends unless told otherwise."""
    kind, *params = [part.strip().lower() for part in (value or "application/json").split(";")]
    charset = next((p.split("=", 1)[1].strip().strip('"') for p in params if p.startswith("charset=")), "utf-8")
    if kind != "application/json" and not kind.endswith("+json") or charset not in ("utf-8", "utf8"):
        curl = "curl: -H 'Content-Type: application/json'"
        message = f"Content-Type {value[:100]!r}: the body must be JSON in UTF-8 ({curl})"
        raise ApiError(415, message, code="unsupported_media_type")


def parse_body(raw: bytes) -> dict:
    """The request's JSON object; ApiError 400 for anything else: not UTF-8, not JSON (NaN and Infinity are not),
    nested too deep to parse, an integer of more than MAX_INT_DIGITS digits, or not an object."""
    try:  # decoded first: json.loads would take UTF-16 and UTF-8-encoded surrogates too
        body = json.loads(raw.decode("utf-8-sig"), parse_constant=_refuse_constant, parse_int=_short_int)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise ApiError(400, f"the body is not valid JSON ({why})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _short_int(digits: str) -> int:
    """An integer of the body; a longer one than any field takes is refused before Python converts it (the
    conversion costs the square of its length; Python itself refuses beyond 4,300 digits)."""
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits.lstrip('-')):,} digits; at most {MAX_INT_DIGITS} are read")
    return int(digits)


def _field(body: dict, name: str, kinds: tuple[type, ...], default=None, what: str = ""):
    """body[name] if it has one of `kinds` (bool is not a number here), `default` if absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"{name}: expected {what or ' or '.join(k.__name__ for k in kinds)}", param=name)
    return value


def _number(body: dict, name: str, default: float | None = None) -> float | None:
    """body[name] as a float (an integer of at most MAX_INT_DIGITS digits always converts)."""
    value = _field(body, name, (int, float), default, what="a number")
    return None if value is None else float(value)


def check_request(body: dict, model: ServedModel, chat: bool) -> Spec:
    """Check `body` of /v1/completions (`chat` False) or /v1/chat/completions; ApiError (400/404) naming the bad
    field. The fields are checked in a fixed order, the cheap ones before the prompt is tokenized, so that a
    request with several faults always gets one answer."""
    _check_model(body, model)
    _check_fields(body, chat)
    stop = _stop_strings(body)
    prompt, max_tokens = _chat_prompt(body, model) if chat else _completion_prompt(body)
    _check_length(body, prompt, max_tokens, model.context, chat)
    # a chat-tuned model's completion ends at the end of its turn too (<|im_end|>), as its export's and GGUF's do
    params = _sampling(body, max_tokens, model.context - len(prompt), stop_ids(chat or model.chat))
    stream = _field(body, "stream", (bool,), default=False)
    return Spec(prompt, params, stop, stream, include_usage=_include_usage(body, stream))


def _include_usage(body: dict, stream: bool) -> bool:
    """stream_options.include_usage, the one option there is, which only a stream can take (as OpenAI answers)."""
    options = _field(body, "stream_options", (dict,), default={})
    if options and not stream:
        raise ApiError(400, "stream_options: only with stream: true", param="stream_options")
    for name in options:
        if name != "include_usage":
            message = f"stream_options: unrecognized option {name[:100]!r}; it takes include_usage"
            raise ApiError(400, message, "stream_options", "unknown_field")
    return _field(options, "include_usage", (bool,), default=False)


def _check_model(body: dict, model: ServedModel) -> None:
    name = _field(body, "model", (str,))
    if name is None:
        raise ApiError(400, "model: required; GET /v1/models lists it", param="model")
    if name != model.name:
        message = f"the model {name[:200]!r} does not exist; this server has {model.name!r}"
        raise ApiError(404, message, "model", "model_not_found")


def _check_fields(body: dict, chat: bool) -> None:
    """Every field is one this endpoint reads, or one that would change the answer holding a value that does
    not: nothing a client asks for is ignored silently."""
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name, value in body.items():
        if name in fields or value is None:
            continue
        if name in NEUTRAL:
            if not any(_same(value, neutral) for neutral in NEUTRAL[name]):
                allowed = " or ".join(json.dumps(v) for v in NEUTRAL[name])
                raise ApiError(400, f"{name}: not supported by axiom serve (leave it out, or {allowed})", name)
            continue
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        known = ", ".join(sorted(fields))
        message = f"unrecognized request argument {name[:100]!r}; {endpoint} takes {known}"
        raise ApiError(400, message, name[:100], "unknown_field")


def _same(value, neutral) -> bool:
    """value == neutral as JSON compares them: true is not 1, 1.0 is 1."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    return value == neutral


def _stop_strings(body: dict) -> list[str]:
    stop = _field(body, "stop", (str, list), default=[], what="a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        message = f"stop: expected up to {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters"
        raise ApiError(400, message, param="stop")
    return stop


def _check_length(body: dict, prompt: list[int], max_tokens: int | None, context: int, chat: bool) -> None:
    """The prompt leaves room for a token; max_tokens, when given, asks for at least one."""
    if len(prompt) >= context:
        _context_exceeded(f"the prompt has {len(prompt)}", context, chat)
    if max_tokens is not None and max_tokens <= 0:
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        raise ApiError(400, f"{name}: must be at least 1, not {max_tokens}", param=name)


def _context_exceeded(what: str, context: int, chat: bool) -> None:
    raise ApiError(
        400,
        f"this model's context is {context} tokens and {what}; a prompt must leave room for at least one new token",
        "messages" if chat else "prompt",
        "context_length_exceeded",
    )


def _sampling(body: dict, max_tokens: int | None, room: int, stop: tuple[int, ...]) -> SamplingParams:
    """The request's sampling parameters; max_tokens (None: all the room there is) is capped by the context, where
    the answer ends with finish_reason "length"."""
    params = SamplingParams(
        max_new_tokens=min(max_tokens or room, room),
        temperature=_number(body, "temperature", default=1.0),
        top_p=_number(body, "top_p"),
        top_k=_field(body, "top_k", (int,)),
        seed=_field(body, "seed", (int,)),
        stop_ids=stop,
    )
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
    if len(messages) * MIN_TOKENS_PER_MESSAGE >= model.context:  # refused before tokenizing them all
        _context_exceeded(
            f"{len(messages)} messages take at least {MIN_TOKENS_PER_MESSAGE} tokens each", model.context, True
        )
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))):
            raise ApiError(
                400, f"messages[{i}]: expected {{'role': string, 'content': string or list of text parts}}", "messages"
            )
        if other := [k for k, v in m.items() if k not in ("role", "content") and v not in (None, "", [])]:
            field = f"messages[{i}].{str(other[0])[:100]}"
            raise ApiError(400, f"{field}: not supported by axiom serve (a message is role and content)", "messages")
    messages = [{"role": m["role"], "content": _message_text(i, m["content"])} for i, m in enumerate(messages)]
    try:
        ids = list(encode_chat(messages, add_generation_prompt=True).ids)
    except ValueError as e:  # e.g. a role the template does not know
        raise ApiError(400, f"messages: {str(e)[:300]}", "messages") from None
    newer, older = (_field(body, name, (int,)) for name in ("max_completion_tokens", "max_tokens"))  # both checked
    return ids, older if newer is None else newer


def _message_text(i: int, content: str | list) -> str:
    """A message's text: its string, or its list of text parts ({"type": "text", "text": ...}, as OpenAI's clients
    may send) joined by newlines, as vLLM joins them. Any other part (an image, audio, a file) is refused by name:
    the model reads text only."""
    if isinstance(content, str):
        return content
    if not content:
        raise ApiError(400, f"messages[{i}].content: an empty list of parts", "messages")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        where, shape = f"messages[{i}].content[{j}]", "{'type': 'text', 'text': string}"
        if isinstance(kind, str) and kind != "text":
            raise ApiError(400, f"{where}: type {kind!r} is not supported: this model reads text {shape}", "messages")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}: expected {shape}", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


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
