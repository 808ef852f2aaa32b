"""`stop` strings: cut a streamed reply at the first one, holding back what could start one."""

from __future__ import annotations


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
