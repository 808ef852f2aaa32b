"""Batched decode: the active requests advance together, one token each per forward pass.

Each request (a Row) is first prefilled on its own: its prompt from the longest cached prefix,
in chunks, so the rows already decoding wait at most one chunk. Its single-sequence KV cache
then joins the batch's mlx-lm `BatchKVCache` (left padding, per-row offsets; `extend` when a
row joins, `filter` when one leaves, `extract` hands a finished row's cache back to the prompt
LRU). Every step feeds the rows' last tokens as one [B, 1] input; each row samples with its own
settings (and its own seed's random stream, so a seeded reply equals its sequential answer).
Decoding is pipelined as in model/generate.py: step t+1 is queued before tokens t are read.

Only an engine whose whole model is in memory, on one rank, with a plain (unquantized,
non-rotating) KV cache batches; batch_limit() says why another does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, trim_prompt_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_p, make_sampler

from model.generate import CANCEL_WITHIN, FIRST_PROMPT_CHUNK, Engine, GenerationStats
from model.generation_settings import GenerationSettings
from model.memory_plan import prefill_chunk

from .stops import StopText

# Requests decoded together by default: 8 for a dense model, 1 for an MoE model (batched, its
# rows pick different experts: slower on the CPU; BENCHMARKS.md, "The server", at 1, 4, 8).
DEFAULT_BATCH = 8


def batch_limit(engine: Engine, wanted: int | None) -> tuple[int, str]:
    """How many requests `engine` may decode together (at most `wanted`; None: the default for
    the model), and why not more."""
    if wanted is None:
        if engine.model.args.is_moe:
            return 1, ("the default for an MoE model (measured slower batched on this backend: "
                       "BENCHMARKS.md); --batch N batches it")  # fmt: skip
        wanted = DEFAULT_BATCH
    if wanted <= 1:
        return 1, ""
    if engine.offload is not None:
        return 1, "experts are streamed from disk under the memory budget"
    if engine.peers is not None:
        return 1, "the model runs on several ranks"
    if engine.kv_bits:
        return 1, "the KV cache is quantized (--kv-bits)"
    if engine.model.args.sliding_window:
        return 1, "the model uses a sliding-window KV cache"
    return wanted, ""


def row_sampler(settings: GenerationSettings) -> Callable[[mx.array], mx.array] | None:
    """A row's sampler (log-probs [1, V] -> token [1]); None for greedy. A seeded row draws from
    its own key, split as mx.random.seed's global key is split per draw, so its tokens are those
    the sequential engine samples after mx.random.seed(seed)."""
    if settings.temperature == 0:
        return None
    if settings.seed is None:
        return make_sampler(settings.temperature, settings.top_p, settings.min_p)
    key = mx.random.key(settings.seed)
    temp, top_p, min_p = settings.temperature, settings.top_p, settings.min_p

    def sample(logprobs: mx.array) -> mx.array:  # make_sampler's chain, with a key
        nonlocal key
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p != 0.0:
            logprobs = apply_min_p(logprobs, min_p, 1)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logprobs * (1.0 / temp), key=sub)

    return sample


def sample(logprobs: mx.array, samplers: list) -> mx.array:
    """Tokens [B] from log-probs [B, V], each row with its own sampler (None: greedy)."""
    if all(s is None for s in samplers):
        return mx.argmax(logprobs, axis=-1)
    return mx.concatenate([
        mx.argmax(logprobs[i : i + 1], axis=-1) if s is None else s(logprobs[i : i + 1])
        for i, s in enumerate(samplers)
    ])  # fmt: skip


class Row:
    """One request's decoding: its prompt's prefill, then its tokens, text, stop and finish."""

    def __init__(self, engine: Engine, ids: list[int], settings: GenerationSettings,
                 stop: list[str], cache: list | None, cached: int):  # fmt: skip
        self.engine, self.ids = engine, ids
        self.max_tokens = min(settings.max_tokens, engine.context_length - len(ids))
        self.sampler = row_sampler(settings)
        self.cache = cache if cache is not None else engine.model.make_cache()
        self.pending = ids[cached:]
        self.generated: list[int] = []
        self.detokenizer = engine.tokenizer.detokenizer()
        self.stops, self.stopped = StopText(stop), False
        self.stats = GenerationStats(prompt_tokens=len(self.pending))
        self.started = time.perf_counter()
        self.first_token_time = 0.0
        self.first: mx.array | None = None  # the first token [1], once the prompt is read
        self.chunk = FIRST_PROMPT_CHUNK  # then sized from the speed measured, as the engine
        self.max_chunk = prefill_chunk(engine.model.args, engine.context_length)
        self.finish_reason = ""

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
        self.first = sample(logits - mx.logsumexp(logits, axis=-1, keepdims=True),
                            [self.sampler])  # fmt: skip
        mx.async_eval(self.first)  # read at the next step, after that step is queued
        self.pending = []

    def take(self, token: int, cancelled: bool) -> list[str]:
        """Record the token just sampled; the text it adds (stop strings held back). Sets
        finish_reason when the row is done, as the sequential engine ends a reply."""
        self.generated.append(token)
        if len(self.generated) == 1:
            self.first_token_time = time.perf_counter()
            self.stats.prompt_tps = self.stats.prompt_tokens / (
                self.first_token_time - self.started
            )
        if token in self.engine.tokenizer.eos_ids:
            self.finish_reason = "stop"
            return self._text(self.detokenizer.finish(), True)
        out = self._text(self.detokenizer.add(token), False)
        if self.stopped:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.max_tokens:
            self.finish_reason = "length"
            out += self._text(self.detokenizer.finish(), True)
        elif cancelled:
            self.finish_reason = "cancelled"
        return out

    def _text(self, text: str, last: bool) -> list[str]:
        out = []
        if text and not self.stopped:
            safe, self.stopped = self.stops.add(text)
            if safe:
                out.append(safe)
        if last and not self.stopped and (tail := self.stops.flush()):
            out.append(tail)
        return out

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


def start_cache(cache: list | None, ids: list[int], rest: list[int]) -> tuple[list | None, int]:
    """A cache fetched for `ids` (LRUPromptCache.fetch_nearest_cache: `rest` is what it lacks)
    -> (cache, tokens it holds), keeping at least one token to feed so there are logits."""
    if cache is None:
        return None, 0
    cached = min(len(ids) - len(rest), len(ids) - 1)
    surplus = cache[0].offset - cached
    if surplus > 0 and trim_prompt_cache(cache, surplus) != surplus:
        return None, 0
    return cache, cached


class Batch:
    """The rows decoding together and their KV cache: one BatchKVCache per layer (the row's
    own KVCache while it is alone)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.rows: list[Row] = []
        self.cache: list = []  # BatchKVCache per layer, or one row's KVCache per layer
        self.tokens: mx.array | None = None  # [B]: each row's latest sampled token, unread

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: list[Row]) -> None:
        """Add prefilled rows: their caches enter the batch, their first tokens are next. One
        row alone keeps its own KVCache (the sequential engine's computation, and faster on
        the CPU than a batch of one); a second one turns the caches into BatchKVCaches."""
        caches = ([self.cache] if self.rows else []) + [row.cache for row in rows]
        tokens = ([self.tokens] if self.rows else []) + [row.first for row in rows]
        if len(caches) == 1:
            self.cache = caches[0]
        elif self.rows and isinstance(self.cache[0], BatchKVCache):
            for mine, *theirs in zip(self.cache, *caches[1:]):
                mine.extend(BatchKVCache.merge(theirs))
        else:
            self.cache = [BatchKVCache.merge(list(layer)) for layer in zip(*caches)]
        self.tokens = mx.concatenate(tokens)
        for row in rows:
            row.cache = []  # the batch holds it now
        self.rows += rows

    def step(self) -> list[int]:
        """Queue the next forward pass over all rows, then read (and return) the tokens of the
        previous one, row by row."""
        model = self.engine.model
        tokens = self.tokens
        hidden = model.hidden_states(tokens[:, None], cache=self.cache)
        logits = model.logits(hidden[:, -1, :])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        self.tokens = sample(logprobs, [row.sampler for row in self.rows])
        mx.async_eval(self.tokens)
        return tokens.tolist()

    def leave(self, done: list[int]) -> list[tuple[Row, list]]:
        """Remove the rows at indices `done`; each with its own KV cache (a list of KVCache)."""
        if not isinstance(self.cache[0], BatchKVCache):  # one row, with its own cache
            gone = [(self.rows[0], self.cache)]
            self.rows, self.cache, self.tokens = [], [], None
            return gone
        gone = [(self.rows[i], [extract(c, i) for c in self.cache]) for i in done]
        keep = [i for i in range(len(self.rows)) if i not in set(done)]
        if len(keep) == 1:  # back to one row: its own KVCache again
            self.cache = [extract(c, keep[0]) for c in self.cache]
        elif keep:
            for c in self.cache:
                c.filter(keep)
        else:
            self.cache = []
        self.tokens = self.tokens[mx.array(keep)] if keep else None
        self.rows = [self.rows[i] for i in keep]
        return gone

    def clear(self) -> list[Row]:
        """Drop every row (after a failure): their caches are lost."""
        rows, self.rows, self.cache, self.tokens = self.rows, [], [], None
        return rows


def extract(cache: BatchKVCache, i: int) -> KVCache:
    """Row i's keys and values as a single-sequence KVCache (mlx-lm's extract, made concrete so
    the batch's arrays can be freed)."""
    single = cache.extract(i)
    mx.eval(single.keys, single.values)
    return single
