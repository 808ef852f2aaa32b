"""One request in a batch (a Row): its checks, its prompt read from the longest cached prefix in
chunks, then its tokens, text and figures as the batch decodes it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import mlx.core as mx

from ..errors import MixchatError
from ..generate import CANCEL_WITHIN, FIRST_PROMPT_CHUNK, Engine, GenerationStats, over_context
from ..generation_settings import GenerationSettings
from ..memory_plan import prefill_chunk
from ..mlx_lm_parts import trim_prompt_cache
from .reply import ReplyText
from .sampling import request_sampler, sample_rows

NearestCache = Callable[[list[int]], tuple[list | None, list[int]]]


class Row:
    """One request's decoding. Raises MixchatError, as Engine.stream does, for bad settings or
    a prompt over the context. `nearest(ids)`, called once the request is checked: a stored KV
    cache (a copy) sharing a prefix with `ids` and the tokens of `ids` it lacks (mlx-lm's
    LRUPromptCache.fetch_nearest_cache), or (None, ids); None: no stored caches."""

    def __init__(self, engine: Engine, ids: list[int], settings: GenerationSettings,
                 stop: list[str], nearest: NearestCache | None = None):  # fmt: skip
        settings.validate()
        if len(ids) >= engine.context_length:
            raise MixchatError(over_context(engine, len(ids)))
        self.engine, self.ids = engine, ids
        cache, cached = reusable_cache(*nearest(ids), ids) if nearest else (None, 0)
        self.cache = cache if cache is not None else engine.model.make_cache()
        self.pending = ids[cached:]
        self.sampler = request_sampler(settings)
        max_tokens = min(settings.max_tokens, engine.context_length - len(ids))
        self.reply = ReplyText(engine.tokenizer, stop, max_tokens)
        self.generated: list[int] = []
        self.stats = GenerationStats(prompt_tokens=len(self.pending))
        self.started = time.perf_counter()
        self.first_token_time = 0.0
        self.first: mx.array | None = None  # the first token [1], once the prompt is read
        self.chunk = FIRST_PROMPT_CHUNK  # then sized from the speed measured, as the engine's
        self.max_chunk = prefill_chunk(engine.model.args, engine.context_length)
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """The reader has gone: the row ends at its next token or prompt chunk. Thread-safe."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def finish_reason(self) -> str:
        return self.reply.finish_reason

    @property
    def prefilled(self) -> bool:
        return self.first is not None

    def prefill_step(self) -> None:
        """Read the next chunk of the prompt; the last one also samples the first token."""
        model = self.engine.model
        if len(self.pending) > self.chunk:
            began = time.perf_counter()
            model.hidden_states(mx.array(self.pending[: self.chunk])[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            self.pending = self.pending[self.chunk :]
            rate = self.chunk / max(time.perf_counter() - began, 1e-6)
            self.chunk = min(self.max_chunk, max(16, int(rate * CANCEL_WITHIN)))
            return
        hidden = model.hidden_states(mx.array(self.pending)[None], cache=self.cache)
        logits = model.logits(hidden[:, -1, :])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        self.first = sample_rows(logprobs, [self.sampler])
        mx.async_eval(self.first)  # read at the next step, after that step is queued
        self.pending = []

    def take(self, token: int) -> list[str]:
        """Record the token just sampled; the text it adds. Sets finish_reason when done."""
        self.generated.append(token)
        if len(self.generated) == 1:
            self.first_token_time = time.perf_counter()
            self.stats.prompt_tps = self.stats.prompt_tokens / (
                self.first_token_time - self.started
            )
        return self.reply.add(token, self.cancelled)

    def finish(self, cache: list, reason: str | None = None) -> GenerationStats:
        """The row's figures once it has left the batch with `cache` (its own KV cache)."""
        s = self.stats
        s.finish_reason = reason or self.finish_reason
        s.generation_tokens = len(self.generated)
        elapsed = time.perf_counter() - self.first_token_time
        s.generation_tps = (s.generation_tokens - 1) / elapsed if s.generation_tokens > 1 else 0.0
        s.peak_memory_gb = mx.get_peak_memory() / 1e9
        s.context_tokens = min(cache[0].offset, len(self.ids) + len(self.generated))
        self.cache = cache
        return s

    def cache_tokens(self) -> list[int]:
        """The tokens whose keys and values self.cache holds."""
        return (self.ids + self.generated)[: self.cache[0].offset]


def reusable_cache(cache: list | None, rest: list[int], ids: list[int]) -> tuple[list | None, int]:
    """A cache fetched for `ids` (`rest`: the tokens it lacks) -> (cache, tokens of `ids` it
    holds), trimmed so at least one token is left to feed (there must be logits)."""
    if cache is None:
        return None, 0
    cached = min(len(ids) - len(rest), len(ids) - 1)
    surplus = cache[0].offset - cached
    if surplus > 0 and trim_prompt_cache(cache, surplus) != surplus:
        return None, 0
    return cache, cached
