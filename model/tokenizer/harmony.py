"""gpt-oss's harmony format on the way out: the reply shown is the `final` channel.

A gpt-oss reply is a run of messages, each a header and a body:
`<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>…<|return|>`
(the chat template ends the prompt with `<|start|>assistant`). `analysis` is the model's
reasoning and `commentary` its tool calls: neither is shown, as OpenAI's harmony guide asks.
Text before any header (a raw completion) and bodies of messages without a channel are shown.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import StreamingDetokenizer

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
MARKERS = (START, CHANNEL, MESSAGE, *ENDS, "<|constrain|>")
SHOWN = "final"


def harmony_markers(token_id: Callable[[str], int | None]) -> dict[int, str] | None:
    """The harmony markers' ids in a vocabulary (None: not a harmony vocabulary)."""
    ids = {t: token_id(t) for t in MARKERS}
    if ids[CHANNEL] is None or ids[MESSAGE] is None:
        return None
    return {i: t for t, i in ids.items() if i is not None}


class HarmonyDetokenizer(StreamingDetokenizer):
    """Streams only the shown messages' bodies, each through a fresh `make()` detokenizer;
    headers are read with `decode` (the channel's name)."""

    def __init__(self, make: Callable[[], StreamingDetokenizer],
                 decode: Callable[[list[int]], str], markers: dict[int, str]):  # fmt: skip
        self.make, self.decode, self.markers = make, decode, markers
        self.body: StreamingDetokenizer | None = make()  # shown until a header starts
        self.header: list[int] | None = None  # ids after <|channel|> (None: no channel named)
        self.in_header = False

    def add(self, token_id: int) -> str:
        marker = self.markers.get(token_id)
        if marker is None:
            if self.in_header:
                if self.header is not None:
                    self.header.append(token_id)
                return ""
            return self.body.add(token_id) if self.body is not None else ""
        out = self._close()
        if marker in (START, CHANNEL):
            self.in_header = True
            if marker == CHANNEL:
                self.header = []
            elif marker == START:
                self.header = None
        elif marker == MESSAGE:
            name = self.decode(self.header).strip() if self.header is not None else SHOWN
            self.in_header, self.header = False, None
            if name.split(" ")[0] == SHOWN:
                self.body = self.make()
        elif marker in ENDS:
            self.in_header = False
        return out

    def _close(self) -> str:
        """A marker ends the shown body, if one is open."""
        body, self.body = self.body, None
        return body.finish() if body is not None else ""

    def finish(self) -> str:
        return self._close()
