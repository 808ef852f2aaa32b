"""Streaming detokenizers: generated ids to text one token at a time, never a broken character.

`SentencePieceDetokenizer` streams SentencePiece's decode exactly, `ByteDetokenizer` byte-level
BPE, `WindowDetokenizer` any `decode` function. A reply can end in the middle of a character
(max tokens, a stop, a cancel): `finish()` then drops the incomplete character where `decode`
would end in U+FFFD, so a reply only ever holds whole characters.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Protocol

from .base import StreamingDetokenizer

PIECE, CONTROL, UNKNOWN, BYTE = range(4)  # kinds of SentencePiece pieces


def _replace_per_byte(error: UnicodeDecodeError) -> tuple[str, int]:
    """One U+FFFD per invalid byte, as SentencePiece's byte-fallback decoding does."""
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error("mixchat.per_byte", _replace_per_byte)


class PieceTable(Protocol):
    """A SentencePiece vocabulary as its detokenizer reads it (SentencePieceTokenizer)."""

    strip_first_space: bool

    def table(self) -> tuple[list[str], list[int], list[int]]: ...


class SentencePieceDetokenizer(StreamingDetokenizer):
    """Streams `sp.decode` exactly: byte pieces go through an incremental UTF-8 decoder (one
    U+FFFD per invalid byte, a run of byte pieces ends at the next non-byte piece), control
    pieces vanish, and the first text piece loses its leading space (add_dummy_prefix)."""

    def __init__(self, tokenizer: PieceTable):
        self.surfaces, self.byte_values, self.kinds = tokenizer.table()
        self.strip = tokenizer.strip_first_space
        self.utf8 = codecs.getincrementaldecoder("utf-8")("mixchat.per_byte")
        self.pending = False  # a byte run is open in the decoder

    def add(self, token_id: int) -> str:
        if not 0 <= token_id < len(self.kinds):
            return ""
        b = self.byte_values[token_id]
        if b >= 0:
            self.pending = True
            self.strip = False
            return self.utf8.decode(bytes((b,)))
        out = self._end_run() if self.pending else ""
        kind = self.kinds[token_id]
        if kind == CONTROL:
            return out
        surface = self.surfaces[token_id]
        if self.strip and kind == PIECE and surface.startswith(" "):
            surface = surface[1:]
        self.strip = False
        return out + surface

    def _end_run(self) -> str:
        """A byte run ended by a piece: its incomplete character is U+FFFD per byte, as decode."""
        self.pending = False
        out = self.utf8.decode(b"", final=True)
        self.utf8.reset()
        return out

    def finish(self) -> str:
        """The reply ends: an incomplete character (the decoder holds only those) is dropped."""
        self.pending = False
        self.utf8.reset()
        return ""


class ByteDetokenizer(StreamingDetokenizer):
    """Byte-level BPE: each token is a fixed byte string; an incremental UTF-8 decoder holds back
    incomplete characters (U+FFFD only for bytes that can never form one, as decode does)."""

    def __init__(self, table: list[bytes]):
        self.table = table
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token_id: int) -> str:
        if not 0 <= token_id < len(self.table):
            return ""
        return self.utf8.decode(self.table[token_id])

    def finish(self) -> str:
        """The reply ends: an incomplete character (the decoder holds only those) is dropped."""
        self.utf8.reset()
        return ""


class WindowDetokenizer(StreamingDetokenizer):
    """Any `decode` function: decode a short window (the last emitted chunk as context plus the
    new tokens) and emit the growth, holding back text that ends in U+FFFD (incomplete).

    Cost per token is bounded by the window, not the reply. The window keeps at most `max_held`
    unfinished tokens; past that, held text is emitted even if it ends in U+FFFD.
    """

    def __init__(self, decode: Callable[[list[int]], str], max_held: int = 8):
        self.decode, self.max_held = decode, max_held
        self.ids: list[int] = []
        self.context = 0  # ids[:context] were already emitted, decoding to context_text
        self.context_text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd") and len(self.ids) - self.context < self.max_held:
            return ""
        new = text[len(self.context_text) :]
        if new:  # the chunk just emitted becomes the context of the next one
            self.ids = self.ids[self.context :]
            self.context_text = self.decode(self.ids)
        else:
            self.context_text = text
        self.context = len(self.ids)
        return new

    def finish(self) -> str:
        """The held tokens' text, without a last character they leave incomplete (U+FFFD): the
        longest run of them whose text does not end in U+FFFD."""
        new = ""
        for end in range(len(self.ids), self.context, -1):
            text = self.decode(self.ids[:end])
            if not text.endswith("\ufffd"):
                new = text[len(self.context_text) :]
                break
        self.ids, self.context, self.context_text = [], 0, ""
        return new
