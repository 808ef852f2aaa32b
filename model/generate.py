"""Generation: an Engine owns a model, its tokenizer and one conversation's KV cache.

`Engine.stream(messages, settings)` encodes the conversation, prefills only the tokens the KV
cache has not seen, then samples token by token (mlx-lm's samplers), yielding text through a
streaming detokenizer. Decoding is pipelined: step t+1 is queued before token t is read back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import MixchatError
from .generation.sampling import request_sampler
from .generation_settings import GenerationSettings
from .load_options import LoadOptions
from .memory_plan import LAYERWISE_WINDOW
from .mixtral import Model
from .mlx_lm_parts import can_trim_prompt_cache, trim_prompt_cache
from .stats import GenerationStats  # MLX-free, with its JSON form; re-exported here

FIRST_PROMPT_CHUNK = 16  # prompt tokens in the first pass, which measures the prompt speed
CANCEL_WITHIN = 1.0  # seconds a later prompt pass aims to take: how soon Esc acts while reading


@dataclass
class Chunk:
    text: str  # new text; never splits a multi-byte character
    stats: GenerationStats | None = None  # set on the final chunk only
    progress: tuple[int, int] | None = None  # while reading the prompt: (tokens read, total)


def agree_stop(group, stop: bool) -> bool:
    """Whether any rank wants to stop the reply now (rank 0 on a cancel), agreed by all ranks
    of `group` at the same token; `stop` itself on one rank (`group` None)."""
    if group is None:
        return stop
    total = mx.distributed.all_sum(mx.array([int(stop)], dtype=mx.int32), group=group)
    return bool(total.item())


def over_context(engine: Engine, prompt_tokens: int) -> str:
    """The one line for a prompt the engine's context cannot take, naming whose limit it is:
    the model's, or the shorter one this run set (--max-context, or what the budget leaves)."""
    context, model_context = engine.context_length, engine.model.args.context_length
    if context >= model_context:
        limit = f"the model's {context:,}-token context"
    else:
        limit = (f"the {context:,}-token context of this run (set by --max-context or the "
                 f"memory budget; the model's is {model_context:,})")  # fmt: skip
    return f"the prompt is {prompt_tokens:,} tokens, over {limit}"


class Engine:
    def __init__(self, model: Model, tokenizer, name: str = "model", info=None, *,
                 group=None, peers=None):  # fmt: skip
        """`group`: the mx.distributed group a model split over several ranks computes in
        (None: one rank); `peers`: rank 0's model.distributed.Leader, which sends each request
        to the other ranks (None elsewhere)."""
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.info = info
        memory = getattr(model, "memory", None)  # a memory_plan.MemoryDecision, or None
        self.context_length = memory.context if memory is not None else model.args.context_length
        self.kv_bits = memory.plan.kv_bits if memory is not None else None
        self.memory_notice = memory.notice if memory is not None else ""  # one line, or ""
        self.adapter_path: str | None = None  # the LoRA adapter applied (set_adapter), or None
        # Called after each generated token with int counts [num_layers, num_experts].
        self.routing_observer: Callable[[np.ndarray], None] | None = None
        # Counts [num_layers, num_experts] over the last reply's generated tokens (MoE only).
        self.last_routing: np.ndarray | None = None
        self._routing_steps: list[mx.array] = []
        self._observed_by: Callable[[np.ndarray], None] | None = None
        self._cancel = threading.Event()
        self._chunk_override: int | None = None  # tests: prompt tokens per attention pass
        self._cache: list | None = None
        self._cache_tokens: list[int] = []  # the tokens whose keys/values the cache holds
        from .offload import runtime_of

        self.offload = runtime_of(model)  # experts streamed under a memory budget, or None
        self.group = group  # the ranks agree on stopping in it, token by token
        self.peers = peers  # rank 0 of several: the others follow it

    @classmethod
    def load(cls, model: str | Path | None = None, options: LoadOptions | None = None, *,
             split=None, **changes) -> Engine:  # fmt: skip
        """Load a model by path, cached repo id, or None for the embedded default model, as
        `options` say (`changes`: LoadOptions fields by name, `Engine.load(m, kv_bits=8)`).

        A memory budget of None loads whole when the model fits in the memory available now
        and streams under the automatic budget when not (`engine.memory_notice` then says so,
        in one line). `split` (model.distributed.RankSplit, from the app): this rank's part of
        a model split over several ranks. Nothing is read from the environment
        (app/settings.py does)."""
        from .info import model_info
        from .loader import load_checkpoint
        from .registry import DEFAULT_MODEL

        loaded = load_checkpoint(model, (options or LoadOptions()).but(**changes), split=split)
        built = loaded.model
        name = DEFAULT_MODEL if model is None else _display_name(str(model), loaded.path)
        compute_bytes = built.model.norm.weight.dtype.size
        info = model_info(loaded.checkpoint, name, compute_bytes)
        if split is None:
            engine = cls(built, loaded.tokenizer, name, info)
        else:
            engine = cls(built, loaded.tokenizer, name, info, group=split.group,
                         peers=split.leader())  # fmt: skip
        engine.adapter_path = loaded.adapter_path
        return engine

    def set_adapter(self, path: str | None) -> None:
        """Apply the LoRA adapter in `path` instead of the current one (None: none), and
        forget the KV cache (computed with the old weights). A MixchatError (one line) for an
        adapter that does not fit leaves the model without one."""
        from .tune.lora import set_adapter

        self.reset()
        self.adapter_path = None
        set_adapter(self.model, path)
        self.adapter_path = None if path is None else str(path)

    def cancel(self) -> None:
        """Stop the running stream at its next token, or the next stream at its first one
        (so a cancel sent just before a stream starts is not lost). Thread-safe."""
        self._cancel.set()

    def reset(self) -> None:
        """Forget the KV cache (a new conversation)."""
        self._cache, self._cache_tokens = None, []
        if self.peers is not None:
            self.peers.reset()

    def cache_state(self) -> tuple[list | None, list[int]]:
        """The KV cache and the tokens it holds, to keep per conversation (a server's LRU).
        The engine goes on using these objects: copy them or use_cache() another first."""
        return self._cache, list(self._cache_tokens)

    def use_cache(self, cache: list | None, tokens: list[int]) -> None:
        """Continue from a cache_state() (None: an empty cache); the engine now owns it."""
        self._cache, self._cache_tokens = cache, list(tokens) if cache is not None else []

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self._prompt_ids(messages))

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        """The chat's prompt; without a chat template, the raw completion of its user and
        assistant texts joined by blank lines (the reply continues the text)."""
        if self.has_chat_template:
            return self.tokenizer.encode_chat(messages)
        from .tokenizer import check_messages

        text = "\n\n".join(c for r, c in check_messages(messages) if r != "system")
        return self._raw_ids(text)

    def _raw_ids(self, prompt: str) -> list[int]:
        bos = self.tokenizer.bos_id
        ids = ([] if bos is None else [bos]) + self.tokenizer.encode(prompt)
        if not ids:
            raise MixchatError("the prompt is empty")
        return ids

    def stream(
        self, messages: list[dict], settings: GenerationSettings | None = None
    ) -> Iterator[Chunk]:
        """Start a reply: settings, messages and the context are checked now (MixchatError),
        and a cancel() from now on stops this stream; tokens come as the iterator is read.
        Without a chat template (a base model), the chat is completed as raw text."""
        return self._start(self._prompt_ids(messages), settings, messages)

    @property
    def thinking_default(self) -> bool | None:
        """Whether the chat template thinks by default, when it has a thinking switch (Qwen3's
        ``enable_thinking``); None when it has none."""
        return getattr(self.tokenizer, "thinking_default", None)

    @property
    def has_chat_template(self) -> bool:
        """False for a base model whose tokenizer has no chat format: use `stream_text`."""
        return getattr(self.tokenizer, "has_chat_template", True)

    def stream_text(
        self, prompt: str, settings: GenerationSettings | None = None
    ) -> Iterator[Chunk]:
        """Raw completion, as mlx-lm and llama.cpp do: BOS when the tokenizer has one, then
        `prompt` as plain text; the reply continues it. Same checks and cache reuse as stream."""
        # Other ranks replay a chat: without a template, this one prompt's chat is the same text.
        messages = None if self.has_chat_template else [{"role": "user", "content": prompt}]
        return self._start(self._raw_ids(prompt), settings, messages)

    def prompt_ids(self, messages: list[dict] | None = None, prompt: str | None = None) -> list[int]:
        """The ids stream(messages) or stream_text(prompt) would feed (a server's cache key)."""
        return self._prompt_ids(messages) if prompt is None else self._raw_ids(prompt)

    def stream_ids(self, ids: list[int], settings: GenerationSettings | None = None) -> Iterator[Chunk]:
        """stream() for a prompt already encoded (prompt_ids(), or token ids from a client)."""
        if not ids:
            raise MixchatError("the prompt is empty")
        return self._start(list(ids), settings, None)

    def _start(
        self, ids: list[int], settings: GenerationSettings | None, messages: list[dict] | None
    ) -> Iterator[Chunk]:
        settings = settings or GenerationSettings()
        settings.validate()
        if self.peers is not None and messages is None:
            raise MixchatError("a raw completion of a chat model does not run on several ranks")
        if len(ids) >= self.context_length:
            raise MixchatError(over_context(self, len(ids)))
        self._cancel.clear()
        if self.peers is not None:  # the other ranks run the same reply (and the same seed)
            settings = self.peers.start_stream(messages, settings)
        return self._stream(ids, settings)

    def _stream(self, ids: list[int], settings: GenerationSettings) -> Iterator[Chunk]:
        max_tokens = min(settings.max_tokens, self.context_length - len(ids))
        sampler = request_sampler(settings)  # a seeded one draws from its own key
        generated: list[int] = []
        try:
            yield from self._generate(ids, generated, max_tokens, sampler)
        except GeneratorExit:  # the reader stopped early: the cache is still consistent
            raise
        except BaseException:
            self.reset()  # the cache's state is unknown after a failure mid-step
            raise
        finally:
            if self._cache is not None:
                self._cache_tokens = (ids + generated)[: self._cache[0].offset]
                # Computed here, in this thread: MLX streams are per thread, and the next reply
                # (another thread in the chat app) cannot compute what this one left lazy.
                mx.eval([c.state for c in self._cache if not c.empty()])

    def _generate(self, ids, generated, max_tokens, sampler) -> Iterator[Chunk]:
        start = time.perf_counter()
        cached = self._reuse_cache(ids)
        cache = self._cache
        pending = ids[cached:]
        read_before = self.offload.snapshot() if self.offload else None
        total, self.last_routing, self._routing_steps = len(pending), None, []
        self._observed_by = self.routing_observer  # an observer attached later catches up
        if self.offload is not None:
            # Experts stream from disk: run the prompt layer by layer over whole windows, so
            # each expert is read once per layer for the window, not once per chunk.
            while len(pending) > LAYERWISE_WINDOW:
                if agree_stop(self.group, self._cancel.is_set()):  # Esc, all ranks
                    yield self._cancelled_in_prompt(total - len(pending))
                    return
                window, pending = pending[:LAYERWISE_WINDOW], pending[LAYERWISE_WINDOW:]
                self._track_kv(len(window))
                self.model.prefill_layerwise(mx.array(window)[None], cache, self._chunk)
                yield Chunk("", progress=(total - len(pending), total))
        else:
            # Chunks sized from the speed measured so far to take about CANCEL_WITHIN seconds
            # (at most self._chunk): progress moves and Esc stops that soon even on a slow CPU.
            # Ranks sharing the experts keep the fixed size: their passes must stay in step.
            sharded = self.group is not None
            size = self._chunk if sharded else min(FIRST_PROMPT_CHUNK, self._chunk)
            while len(pending) > size:
                if agree_stop(self.group, self._cancel.is_set()):  # Esc, all ranks
                    yield self._cancelled_in_prompt(total - len(pending))
                    return
                began = time.perf_counter()
                hidden = self.model.hidden_states(mx.array(pending[:size])[None], cache=cache)
                mx.eval(hidden, [c.state for c in cache])  # hidden: a pipeline rank sends it
                pending = pending[size:]
                if not sharded:
                    rate = size / max(time.perf_counter() - began, 1e-6)
                    size = min(self._chunk, max(16, int(rate * CANCEL_WITHIN)))
                yield Chunk("", progress=(total - len(pending), total))
        self._track_kv(len(pending))
        y, routing = self._step(mx.array(pending)[None], sampler, self.offload is not None)
        mx.async_eval(y)
        # Streaming experts syncs every layer: queuing step t+1 before reading token t gains
        # nothing and would count a decode step as prompt time.
        pipelined = self.offload is None
        offload_start = self.offload.snapshot() if self.offload else None

        stats = GenerationStats(prompt_tokens=len(ids) - cached)
        if read_before is not None and offload_start is not None:
            read = offload_start.minus(read_before).bytes_read
            stats.prompt_bytes_read_per_token = read / max(stats.prompt_tokens, 1)
        detokenizer = self.tokenizer.detokenizer()
        eos = self.tokenizer.eos_ids
        first_token_time = 0.0
        while True:
            if pipelined and len(generated) + 1 < max_tokens:
                next_y, next_routing = self._step(y[None], sampler)
                mx.async_eval(next_y)
            token = y.item()
            generated.append(token)
            if len(generated) == 1:
                first_token_time = time.perf_counter()
                stats.prompt_tps = stats.prompt_tokens / (first_token_time - start)
            if routing is not None:
                self._routing_steps.append(mx.concatenate([r.reshape(1, -1) for r in routing]))
                if (observer := self.routing_observer) is not None:
                    if observer is not self._observed_by:  # attached mid-reply: catch up first
                        self._observed_by = observer
                        for step in self._routing_steps[:-1]:
                            observer(self._count_step(step))
                    observer(self._count_step(self._routing_steps[-1]))
            if token in eos:
                stats.finish_reason = "stop"
                break
            if text := detokenizer.add(token):
                try:
                    yield Chunk(text)
                except GeneratorExit:  # the reader left: other ranks stop at this token too
                    agree_stop(self.group, True)
                    raise
            if len(generated) >= max_tokens:
                stats.finish_reason = "length"
                break
            if agree_stop(self.group, self._cancel.is_set()):  # same token on all ranks
                stats.finish_reason = "cancelled"
                break
            if not pipelined:
                self._track_kv(1)
                next_y, next_routing = self._step(y[None], sampler)
                mx.async_eval(next_y)
            y, routing = next_y, next_routing
        elapsed = time.perf_counter() - first_token_time
        stats.generation_tokens = len(generated)
        stats.generation_tps = (len(generated) - 1) / elapsed if len(generated) > 1 else 0.0
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        stats.context_tokens = min(self._cache[0].offset, len(ids) + len(generated))
        if self.offload is not None and offload_start is not None:
            self._offload_stats(stats, offload_start, elapsed, len(generated) - 1)
        self._keep_routing()
        yield Chunk(detokenizer.finish(), stats)

    def _keep_routing(self) -> None:
        """Sum the reply's routing (gathered lazily, one small array a token) into last_routing."""
        steps, self._routing_steps = self._routing_steps, []
        if steps:
            experts = np.array(mx.stack(steps)).reshape(len(steps), len(steps[0]), -1)
            counts = np.zeros((experts.shape[1], self.model.args.num_local_experts), np.int64)
            for layer in range(experts.shape[1]):
                counts[layer] = np.bincount(experts[:, layer].ravel(), minlength=counts.shape[1])
            self.last_routing = counts

    def _cancelled_in_prompt(self, done: int) -> Chunk:
        """The final chunk of a stream cancelled between prompt chunks (nothing generated)."""
        offset = self._cache[0].offset if self._cache else 0
        stats = GenerationStats(prompt_tokens=done, finish_reason="cancelled", context_tokens=offset)
        return Chunk("", stats)

    @property
    def _chunk(self) -> int:
        """Prompt tokens per attention pass (fewer for long contexts: bounded scores)."""
        from .memory_plan import prefill_chunk

        return self._chunk_override or prefill_chunk(self.model.args, self.context_length)

    def _track_kv(self, upcoming: int) -> None:
        """Before `upcoming` tokens enter the KV cache, give the expert cache what the KV cache
        will not use (budgets only). The KV cache grows in steps of kv_cache.KV_STEP tokens."""
        if self.offload is None or self._cache is None:
            return
        offset = self._cache[0].offset
        planned = self.model.memory.plan.kv_bytes_at(offset + upcoming)
        self.offload.release()  # everything queued so far has been evaluated
        self.offload.set_kv_bytes(max(sum(c.nbytes for c in self._cache), planned))

    def _offload_stats(self, stats: GenerationStats, start, elapsed: float, steps: int) -> None:
        """Expert cache statistics over the decode steps (after the prompt's pass)."""
        delta = self.offload.snapshot().minus(start)
        stats.expert_hit_rate = delta.hit_rate
        stats.bytes_read_per_token = delta.bytes_read / steps if steps > 0 else None
        stats.load_seconds = delta.load_seconds
        stats.compute_seconds = max(0.0, elapsed - delta.load_seconds)

    def _step(self, tokens: mx.array, sampler, layerwise: bool = False
              ) -> tuple[mx.array, list | None]:  # fmt: skip
        """Queue one forward pass over `tokens` [1, T] (layer by layer over all of them when
        `layerwise`); returns the sampled next token [1]."""
        if self.model.stage is not None:  # a pipeline's ranks: the last samples, all get it
            return self.model.stage.step(self.model, tokens, self._cache, sampler), None
        observe = self.model.args.is_moe  # cheap: kept for last_routing (F4 after a reply)
        self.model.routing = [] if observe else None
        if layerwise and tokens.shape[1] > 1:
            hidden = self.model.prefill_layerwise(tokens, self._cache, self._chunk)
        else:
            hidden = self.model.hidden_states(tokens, cache=self._cache)
        logits = self.model.logits(hidden[:, -1, :])  # only the last position is sampled
        routing, self.model.routing = self.model.routing, None
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if routing is not None:
            routing = [r[:, -1] for r in routing]  # the position that produced the token
        return sampler(logprobs), routing

    def _count_step(self, step: mx.array) -> np.ndarray:
        """[layers, experts] counts of one kept step ([layers, k] expert ids)."""
        experts = np.array(step)
        counts = np.zeros((experts.shape[0], self.model.args.num_local_experts), dtype=np.int64)
        for layer in range(experts.shape[0]):
            np.add.at(counts[layer], experts[layer], 1)
        return counts

    def _reuse_cache(self, ids: list[int]) -> int:
        """Keep the cached prefix shared with `ids`; returns how many tokens need no prefill."""
        if self._cache is None:
            self._cache, self._cache_tokens = self.model.make_cache(self.kv_bits), []
        common = 0
        for a, b in zip(self._cache_tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must be fed to get logits
        surplus = self._cache[0].offset - common
        if surplus > 0:
            if can_trim_prompt_cache(self._cache) and trim_prompt_cache(self._cache, surplus) == surplus:
                pass
            else:  # a rolled-over sliding-window cache cannot rewind: start again
                self._cache, common = self.model.make_cache(self.kv_bits), 0
        self._cache_tokens = ids[:common]
        return common


def _display_name(spec: str, path: Path) -> str:
    if path.suffix == ".gguf":
        return path.stem
    return path.resolve().name if Path(spec).expanduser().exists() else spec
