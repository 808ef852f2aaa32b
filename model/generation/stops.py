"""`stop` strings: cut a streamed reply at the first one, holding back what could start one;
stop_at() applies them to an Engine's stream."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..generate import Chunk


class StopText:
    """Feed text chunks to add(); it returns what is safe to send and whether a stop matched.

    Text that could be the beginning of a stop string is held back until the next chunk shows
    it is not (so a stop split across tokens is still caught and never sent)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def add(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """What is still held back once the reply has ended without a stop."""
        held, self.held = self.held, ""
        return held


def stop_at(chunks: Iterator[Chunk], stops: list[str], cancel: Callable[[], None]
            ) -> Iterator[Chunk]:  # fmt: skip
    """An Engine stream's chunks with `stops` applied: the text up to the first stop string,
    then `cancel()` (the engine ends at its next token, its KV cache consistent) and nothing
    more; the final chunk's stats.finish_reason is then "stop". One chunk out per chunk in."""
    text, stopped = StopText(stops), False
    for chunk in chunks:
        if stopped:
            chunk.text = ""
        elif chunk.text:
            chunk.text, stopped = text.add(chunk.text)
            if stopped:
                cancel()
        if chunk.stats is not None:  # the last chunk
            if stopped:
                chunk.stats.finish_reason = "stop"
            else:
                chunk.text += text.flush()
        yield chunk
