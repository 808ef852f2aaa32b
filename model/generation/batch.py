"""Batched decode: the active requests advance together, one token each per forward pass.

Each request (a Row, row.py) is first prefilled on its own: its prompt from the longest cached
prefix, in chunks, so the rows already decoding wait at most one chunk. Its single-sequence KV
cache then joins the batch's mlx-lm `BatchKVCache` (left padding, per-row offsets; `extend` when
a row joins, `filter` when one leaves, `extract` hands a finished row's cache back to the
caller's prompt cache). Every step feeds the rows' last tokens as one [B, 1] input; each row
samples with its own settings (and its own seed's key, so a seeded reply equals the Engine's).
Decoding is pipelined as in model/generate.py: step t+1 is queued before tokens t are read.

Only an engine whose whole model is in memory, on one rank, with a plain (unquantized,
non-rotating) KV cache batches; limit.py's batch_limit() says why another does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..generate import Engine, GenerationStats
from ..mlx_lm_parts import BatchKVCache, KVCache
from .row import Row
from .sampling import sample_rows


@dataclass
class RowEvent:
    """What one step did for a row: the text it adds, and once the row is done its figures and
    what to keep of it for its conversation's next turn."""

    row: Row
    text: list[str]
    stats: GenerationStats | None = None  # set when the row is done (it has left the batch)
    kept: tuple[list[int], list] | None = None  # (tokens, their KV cache) of a decoded row


class BatchGenerator:
    """Rows decoded together: insert() one at a time (its prompt is read a chunk per step),
    step() until each is done. Runs in one thread; only Row.cancel() may come from another."""

    def __init__(self, engine: Engine):
        self.batch = Batch(engine)
        self.reading: Row | None = None  # the row whose prompt is being read
        self.decoded = 0  # rows the last step decoded (0: it only read a prompt chunk)

    def __len__(self) -> int:
        """Rows decoding, and the one being prefilled."""
        return len(self.batch) + (self.reading is not None)

    def insert(self, row: Row) -> None:
        """Start `row` (once the previous one inserted is prefilled: `reading` is None)."""
        assert self.reading is None, "one row is prefilled at a time"
        self.reading = row

    def step(self) -> list[RowEvent]:
        """Read a chunk of the prompt being prefilled, then decode one token of every row."""
        events = []
        row = self.reading
        if row is not None and row.cancelled:
            events.append(RowEvent(row, [], row.finish(row.cache, "cancelled")))
            self.reading = None
        elif row is not None:
            row.prefill_step()
            if row.prefilled:
                self.batch.join([row])
                self.reading = None
        self.decoded = len(self.batch)
        if self.batch.rows:
            events += self._decode()
        return events

    def _decode(self) -> list[RowEvent]:
        """One decode step: each row's token read and its text; finished rows leave at once."""
        tokens = self.batch.step()
        events = [RowEvent(row, row.take(token)) for row, token in zip(self.batch.rows, tokens)]
        done = [i for i, row in enumerate(self.batch.rows) if row.finish_reason]
        if done:
            left = {id(row): cache for row, cache in self.batch.leave(done)}
            for event in events:
                if (cache := left.get(id(event.row))) is not None:
                    event.stats = event.row.finish(cache)
                    event.kept = (event.row.cache_tokens(), cache)
        return events

    def clear(self) -> list[Row]:
        """Drop every row (after a failure): their caches are lost."""
        rows = self.batch.clear() + ([self.reading] if self.reading is not None else [])
        self.reading = None
        return rows


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
        self.tokens = sample_rows(logprobs, [row.sampler for row in self.rows])
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
