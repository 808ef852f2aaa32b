"""A reply's tokens -> its text and finish reason, as the Engine ends a reply: end of sequence,
`stop` strings (what could start one held back), max tokens, cancel."""

from __future__ import annotations

from .stops import StopText


class ReplyText:
    """Feed each sampled token to add(); finish_reason is set once the reply is done."""

    def __init__(self, tokenizer, stops: list[str], max_tokens: int):
        self.detokenizer = tokenizer.detokenizer()
        self.eos = tokenizer.eos_ids
        self.stops, self.stopped = StopText(stops), False
        self.max_tokens, self.tokens = max_tokens, 0
        self.finish_reason = ""  # "stop" | "length" | "cancelled" once done

    def add(self, token: int, cancelled: bool) -> list[str]:
        """The text `token` adds (none after a stop string); `cancelled`: the reader has gone,
        so the reply ends here unless it ended anyway."""
        self.tokens += 1
        if token in self.eos:
            self.finish_reason = "stop"
            return self._text(self.detokenizer.finish(), True)
        out = self._text(self.detokenizer.add(token), False)
        if self.stopped:
            self.finish_reason = "stop"
        elif self.tokens >= self.max_tokens:
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
