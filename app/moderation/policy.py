"""One policy composing the guards, used by every surface (`mixchat moderate`, the server's
/v1/moderations and /v1/chat/moderations; chat, `ask` and streaming replies next).

The lexical guard always runs (offline, microseconds); a guard model (Llama Guard 3's format)
runs when one is configured, else the chat model's self-check when asked for and able. Scores
are the worst of the guards, category by category; long texts are checked in chunks.
"""

from __future__ import annotations

import functools
import time

from model.errors import MixchatError

from .lexical import LexicalGuard
from .result import ModerationResult

CHUNK_CHARS = 4000  # about 1,000 tokens: a guard model's prompt stays small
MAX_CHARS = 10_000_000


def check_text(text) -> str:
    """The text to moderate, or a one-line MixchatError: empty, binary, too large."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise MixchatError("the input is not UTF-8 text (binary data?)") from None
    if not isinstance(text, str):
        raise MixchatError(f"the input must be text, not {type(text).__name__}")
    if not text.strip():
        raise MixchatError("nothing to moderate: the text is empty")
    if len(text) > MAX_CHARS:
        raise MixchatError(f"the text is too large to moderate: {len(text):,} characters, "
                           f"at most {MAX_CHARS:,}")  # fmt: skip
    controls = sum(1 for ch in text[:65536] if ord(ch) < 32 and ch not in "\n\r\t\f")
    if "\x00" in text or controls > 0.05 * min(len(text), 65536):
        raise MixchatError("the input looks binary, not text")
    return text


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """`text` in pieces of at most `size` characters, cut at a line or space when one is near."""
    out = []
    while len(text) > size:
        cut = max(text.rfind("\n", size // 2, size), text.rfind(" ", size // 2, size))
        cut = cut if cut > 0 else size
        out.append(text[:cut])
        text = text[cut:]
    return out + [text] if text.strip() or not out else out


class Policy:
    def __init__(self, guards: list | None = None, flag_advice: bool = False,
                 chunk_chars: int = CHUNK_CHARS):  # fmt: skip
        self.guards = guards if guards is not None else [LexicalGuard()]
        self.flag_advice = flag_advice
        self.chunk_chars = chunk_chars

    @classmethod
    def build(cls, guard_model: str | None = None, options=None, engine=None,
              self_check: bool = False, flag_advice: bool = False) -> Policy:  # fmt: skip
        """The lexical guard, plus `guard_model` (a Llama Guard 3 checkpoint loaded with
        `options`) or, without one, the chat `engine` checking itself when `self_check`."""
        guards: list = [LexicalGuard()]
        if guard_model:
            from .llama_guard import LlamaGuard

            # the chat model's adapter is not the guard's
            options = options.but(adapter_path=None) if options is not None else None
            guards.append(LlamaGuard.load(guard_model, options))
        elif self_check and engine is not None:
            from .self_check import SelfCheck

            guards.append(SelfCheck(engine))
        return cls(guards, flag_advice)

    @property
    def names(self) -> str:
        return "+".join(g.name for g in self.guards)

    def check(self, text, role: str = "user", context: list[dict] | None = None) -> ModerationResult:
        """`text` as a `role` ("user" or "assistant") turn; raises MixchatError for bad input."""
        start = time.perf_counter()
        text = check_text(text)
        total: ModerationResult | None = None
        deciders: list[str] = []
        for guard in self.guards:
            result: ModerationResult | None = None
            for piece in chunks(text, self.chunk_chars):
                if guard.name == "lexical":
                    part = guard.check(piece, role)
                else:
                    part = guard.check(piece, role, context)
                result = part if result is None else result.merge(part)
            result.flag_advice = self.flag_advice
            if result.flagged:
                deciders.append(guard.name)
            total = result if total is None else total.merge(result)
        total.flag_advice = self.flag_advice
        total.guard = "+".join(deciders) or self.names
        total.seconds = time.perf_counter() - start
        return total


def guard_model_bytes(policy: Policy | None) -> int:
    """Bytes of the weights a policy's guard models hold (not the self-check's: that is the
    chat model itself)."""
    total = 0
    for guard in policy.guards if policy is not None else []:
        engine = getattr(guard, "engine", None)
        if engine is not None and guard.name == "llama-guard":
            from mlx.utils import tree_flatten

            total += sum(v.nbytes for _, v in tree_flatten(engine.model.parameters()))
    return total


def chat_load_options(options, policy: Policy | None):
    """(the chat model's load options, a line or ""): with a guard model loaded, a memory
    budget in bytes is what its weights leave (an automatic budget or none measures the memory
    available after the guard's load, so counts it already)."""
    guard = guard_model_bytes(policy)
    budget = getattr(options, "memory_budget", None)
    if not guard or not isinstance(budget, int):
        return options, ""
    from model.sizes import format_bytes

    left = budget - guard
    if left <= 0:
        raise MixchatError(f"the guard model's {format_bytes(guard)} fill the "
                           f"{format_bytes(budget)} memory budget: nothing is left for the chat model")  # fmt: skip
    line = (f"the guard model takes {format_bytes(guard)} of the {format_bytes(budget)} memory "
            f"budget: the chat model gets {format_bytes(left)}")  # fmt: skip
    return options.but(memory_budget=left), line


@functools.cache
def default_policy() -> Policy:
    """The offline default (the lexical guard), built once per process (the server's)."""
    return Policy()
