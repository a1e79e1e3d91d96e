"""A conversation with a chat-tuned model: the messages so far, the prompt that fits its context, streamed replies."""

from __future__ import annotations

from collections.abc import Iterator

from axiom.errors import AxiomError
from axiom.infer.engine import Engine, SamplingParams
from axiom.model.transformer import Axiom
from axiom.text.chatml import IM_END, IM_START, encode_chat, message_tokens
from axiom.text.stream import TextStream, stop_ids


class Chat:
    """A conversation with a model: the system message, the exchanges so far and how replies are sampled. When the
    conversation no longer fits the model's context, the oldest exchanges are left out of the prompt (the system
    message stays). The n-th reply samples with seed + n. `compile` decodes with the engine's compiled step
    (axiom/infer/engine.py)."""

    def __init__(
        self,
        model: Axiom,
        system: str | None,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        compile: bool = False,
    ) -> None:
        if model.cfg.vocab_size <= max(IM_START, IM_END):  # its prefill would index past the token table
            raise AxiomError(
                f"the model's vocabulary has {model.cfg.vocab_size:,} ids and the chat template's <|im_start|> and "
                f"<|im_end|> are ids {IM_START} and {IM_END}: chatting needs cl100k_base's whole table; use "
                "axiom generate for this model"
            )
        self.model, self.system, self.max_new_tokens = model, system, max_new_tokens
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.history: list[dict] = []  # user and assistant messages, alternating
        self._lengths: list[int] = []  # tokens of each message of the history, as the template encodes it
        self.turns = 0
        # one cache (and compiled step) for the whole conversation, not one per reply
        self.engine = Engine(model, max_batch=1, compile=compile)

    def prompt(self, user: str) -> tuple[list[int], int]:
        """Ids of the conversation plus `user` and the generation prompt, the oldest exchanges left out until
        there is room for a reply; and how many tokens that reply may have."""
        limit = self.model.cfg.max_seq_len
        room = min(self.max_new_tokens, limit // 2)  # a long history never squeezes a reply below this
        system = [{"role": "system", "content": self.system}] if self.system else []
        asked = {"role": "user", "content": user}
        # each message is encoded apart (axiom.text.chatml), so lengths add up: the history is not encoded again
        # for every exchange left out
        lengths = [len(message_tokens(m["role"], m["content"]).ids) for m in self.history[len(self._lengths) :]]
        self._lengths += lengths
        size, start = len(encode_chat([*system, asked], add_generation_prompt=True).ids) + sum(self._lengths), 0
        while size + room > limit and start < len(self.history):
            size -= self._lengths[start] + self._lengths[start + 1]
            start += 2
        ids = encode_chat([*system, *self.history[start:], asked], add_generation_prompt=True).ids
        if len(ids) >= limit:
            raise AxiomError(
                f"the message and system prompt take {len(ids):,} tokens, the model's context is {limit:,}; "
                "send a shorter message"
            )
        return ids, min(self.max_new_tokens, limit - len(ids))

    def reply(self, user: str) -> Iterator[str]:
        """Stream the reply to `user` as text pieces; the exchange joins the history when the reply ends
        (also when it is stopped early)."""
        ids, budget = self.prompt(user)
        text = TextStream(stop_ids(chat=True))
        # modulo 2**64, as the draws take seeds: the top seed's next reply wraps instead of leaving the seeds' range
        seed = (self.seed + self.turns) % 2**64 if self.seed is not None else None
        params = SamplingParams(budget, self.temperature, self.top_k, self.top_p, seed, text.stop_ids)
        request = self.engine.submit(ids, params)
        try:
            while not request.done:
                for _, token in self.engine.step():
                    if token is None:
                        raise AxiomError(f"decoding failed: {request.error}")
                    if piece := text.push(token):
                        yield piece
            if tail := text.finish():
                yield tail
        finally:
            self.engine.cancel(request)  # a reply stopped early frees the engine's slot
            self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text.text}]
            self.turns += 1

    def reset(self) -> None:
        self.history, self._lengths = [], []
