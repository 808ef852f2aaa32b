"""A scripted engine that follows the ``model.generate.Engine`` contract (docs/CONTRACTS.md).

It streams a known reply word by word with small sleeps, honours ``cancel()``, reports
deterministic routing counts to ``routing_observer`` (and keeps the last reply's in
``last_routing``) and exposes a fake ``info`` (sparse by default, dense with
``FakeEngine.dense()``). It can read the prompt slowly in chunks with progress chunks
(``prompt_chunk``, ``prompt_delay``, ``pause_in_prompt``) and load slowly (``FakeEngine.loader``).
Nothing random, nothing timed in what it yields, so snapshots stay stable.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from model.generate import Chunk, GenerationStats  # the contract's own types, not copies


@dataclass
class FakeModelInfo:
    architecture: str = "mixtral"
    num_layers: int = 4
    num_experts: int = 8
    experts_per_token: int = 2
    hidden_size: int = 256
    total_params: int = 46_700_000_000
    active_params: int = 12_900_000_000
    quantization: str = "4-bit (group 64)"
    size_bytes: int = 24_600_000_000
    source: str = "fake://mixtral"


DEFAULT_REPLY = (
    "Here is an answer with **bold** text and a list:\n\n"
    "- first point\n"
    "- second point\n\n"
    "```python\n"
    "def greet(name: str) -> str:\n"
    '    return f"Hello, {name}!"\n'
    "```\n\n"
    "Done."
)

TOKEN_PATTERN = re.compile(r"\s*\S+|\s+")


def split_tokens(text: str) -> list[str]:
    """Words with their leading whitespace: joining the pieces gives the text back."""
    return TOKEN_PATTERN.findall(text)


ReplyScript = str | list[str] | Callable[[list[dict]], str] | None


class FakeEngine:
    """Engine stand-in. ``reply``: a fixed text, a list used in turn, or a function of messages."""

    def __init__(
        self,
        reply: ReplyScript = None,
        *,
        name: str = "fake-mixtral-8x7b",
        token_delay: float = 0.002,
        num_layers: int = 4,
        num_experts: int = 8,
        context_length: int = 4096,
        fail_with: Exception | None = None,
        pause_after_tokens: int | None = None,
        prompt_chunk: int | None = None,
        prompt_delay: float = 0.0,
        pause_in_prompt: int | None = None,
    ) -> None:
        self.name = name
        self.info = FakeModelInfo(num_layers=num_layers, num_experts=num_experts)
        if num_experts == 0:
            self.info.experts_per_token = 0
            self.info.active_params = self.info.total_params = 7_200_000_000
            self.info.architecture = "mistral"
        self.context_length = context_length
        self.routing_observer: Callable[[np.ndarray], None] | None = None
        self.token_delay = token_delay
        self.fail_with = fail_with
        self.pause_after_tokens = pause_after_tokens
        self.prompt_chunk = prompt_chunk  # read the prompt this many tokens at a time
        self.prompt_delay = prompt_delay  # seconds per prompt chunk
        self.pause_in_prompt = pause_in_prompt  # hold after this many prompt chunks
        self.last_routing: np.ndarray | None = None
        self.calls: list[tuple[list[dict], object]] = []
        self.observed_tokens = 0  # tokens for which routing_observer was called
        self.resets = 0
        self.expert_hit_rate: float | None = None  # reported in the stats when set
        self._reply = reply
        self._reply_index = 0
        self._cancelled = threading.Event()
        self.paused = threading.Event()  # set while stream waits at pause_after_tokens
        self.release = threading.Event()  # set it to let a paused stream go on

    @classmethod
    def load(cls, model: str | None = None, **kw) -> FakeEngine:
        return cls(**kw)

    @classmethod
    def loader(cls, gate: threading.Event, **kw) -> Callable[[], FakeEngine]:
        """An ``engine_loader`` that takes until ``gate`` is set (a model that loads slowly)."""

        def load() -> FakeEngine:
            if not gate.wait(timeout=30):
                raise RuntimeError("the test never let the fake model load")
            return cls(**kw)

        return load

    @classmethod
    def dense(cls, **kw) -> FakeEngine:
        return cls(num_experts=0, name="fake-mistral-7b", **kw)

    def reply_for(self, messages: list[dict]) -> str:
        if self._reply is None:
            return DEFAULT_REPLY
        if isinstance(self._reply, str):
            return self._reply
        if isinstance(self._reply, list):
            text = self._reply[min(self._reply_index, len(self._reply) - 1)]
            self._reply_index += 1
            return text
        return self._reply(messages)

    def count_tokens(self, messages: list[dict]) -> int:
        return sum(len(m["content"]) // 4 + 4 for m in messages)

    def cancel(self) -> None:
        self._cancelled.set()
        self.release.set()

    def reset(self) -> None:
        self.resets += 1

    def stream(self, messages: list[dict], settings=None) -> Iterator[Chunk]:
        self._cancelled.clear()
        self.release.clear()
        self.paused.clear()
        self.calls.append(([dict(m) for m in messages], settings))
        if self.fail_with is not None:
            raise self.fail_with
        max_tokens = getattr(settings, "max_tokens", 512) if settings is not None else 512
        tokens = split_tokens(self.reply_for(messages))
        prompt_tokens = self.count_tokens(messages)
        self.last_routing = None
        if self.prompt_chunk:
            read = yield from self._read_prompt(prompt_tokens)
            if read < prompt_tokens:
                yield Chunk("", GenerationStats(prompt_tokens=read, finish_reason="cancelled"))
                return
        generated = 0
        finish_reason = "stop"
        routing = None
        for token in tokens:
            if self._cancelled.is_set():
                finish_reason = "cancelled"
                break
            if generated >= max_tokens:
                finish_reason = "length"
                break
            if self.pause_after_tokens is not None and generated == self.pause_after_tokens:
                self.paused.set()
                self.release.wait(timeout=10)
                if self._cancelled.is_set():
                    finish_reason = "cancelled"
                    break
            if self.token_delay:
                time.sleep(self.token_delay)
            generated += 1
            observer = self.routing_observer
            if self.info.num_experts:
                counts = self._routing_counts(generated)
                routing = counts.astype(np.int64) if routing is None else routing + counts
                if observer is not None:
                    observer(counts)
                    self.observed_tokens += 1
            yield Chunk(token)
        self.last_routing = routing
        yield Chunk(
            "",
            GenerationStats(
                prompt_tokens=prompt_tokens,
                prompt_tps=1000.0,
                generation_tokens=generated,
                generation_tps=42.0,
                peak_memory_gb=1.25,
                context_tokens=prompt_tokens + generated,
                finish_reason=finish_reason,
                expert_hit_rate=self.expert_hit_rate,
            ),
        )

    def _read_prompt(self, total: int) -> Iterator[Chunk]:
        """Progress chunks while 'reading' the prompt; returns the tokens read (less: cancelled)."""
        assert self.prompt_chunk
        done, chunks = 0, 0
        while total - done > self.prompt_chunk:
            if self._cancelled.is_set():
                return done
            if self.pause_in_prompt is not None and chunks == self.pause_in_prompt:
                self.paused.set()
                self.release.wait(timeout=10)
                if self._cancelled.is_set():
                    return done
            if self.prompt_delay:
                time.sleep(self.prompt_delay)
            done += self.prompt_chunk
            chunks += 1
            yield Chunk("", progress=(done, total))
        return total

    def _routing_counts(self, step: int) -> np.ndarray:
        """Each layer sends the token to 2 experts by a fixed rule that favours a few of them."""
        layers, experts = self.info.num_layers, self.info.num_experts
        counts = np.zeros((layers, experts), dtype=np.int32)
        for layer in range(layers):
            first = (layer * 3 + step % 3) % experts
            counts[layer, first] += 1
            if experts > 1:
                counts[layer, (first + 1 + (step * (layer + 1)) % (experts - 1)) % experts] += 1
        return counts
