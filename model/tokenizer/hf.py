"""Tokenizers on Hugging Face's `tokenizers` (tokenizer.json directories, and the byte-level BPE
rebuilt from GGUF metadata), with the model's Jinja chat template rendered the way transformers'
`apply_chat_template` does."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import cache, cached_property
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, MixchatError
from .base import StreamingDetokenizer, Tokenizer, check_messages
from .detokenizers import ByteDetokenizer, WindowDetokenizer
from .harmony import HarmonyDetokenizer, harmony_markers


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable spelling of each byte, reversed (char -> byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


# Extra variables for the chat templates rendered in this thread or task (a request's
# `chat_template_kwargs`, `ask --no-think`), as transformers' apply_chat_template(**kwargs).
_TEMPLATE_OPTIONS: ContextVar[dict[str, Any] | None] = ContextVar("template_options", default=None)
THINKING_SWITCH = "enable_thinking"  # Qwen3's (and its followers') thinking on/off variable


@contextmanager
def template_options(**options: Any) -> Iterator[None]:
    """Within the block, chat templates (encode_chat, so Engine.stream/prompt_ids/count_tokens
    called here) are rendered with ``options`` as extra variables; None values are left out."""
    token = _TEMPLATE_OPTIONS.set(
        {**current_template_options(), **{k: v for k, v in options.items() if v is not None}}
    )
    try:
        yield
    finally:
        _TEMPLATE_OPTIONS.reset(token)


def current_template_options() -> dict[str, Any]:
    """The variables ``template_options`` set here (a copy; {} outside any)."""
    return dict(_TEMPLATE_OPTIONS.get() or {})


def render_chat_template(template: str, messages: list[dict], **extra: Any) -> str:
    """Render a Hugging Face chat template like transformers does (sandboxed Jinja)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True, **extra
        )
    except Exception as e:  # a template's own error (raise_exception, bad syntax, type error)
        raise MixchatError("chat template: " + " ".join(str(e).split())) from e


def render_tool_chat(template: str | None, messages: list[dict], tools: list | None,
                     specials: dict[str, str], name: str) -> str:  # fmt: skip
    """A chat with tools rendered as transformers' apply_chat_template(tools=...) does; refused
    (one line) when the template would silently drop the tool definitions or calls."""
    if not template:
        raise MixchatError(f"{name} has no chat template")
    missing = [what for what, word, used in (
        ("tool definitions", "tools", bool(tools)),
        ("tool calls", "tool_calls", any(m.get("tool_calls") for m in messages)),
    ) if used and word not in template]  # fmt: skip
    if missing:
        raise MixchatError(f"the chat template of {name} has no {' or '.join(missing)}: "
                           "use a model whose template renders tools")  # fmt: skip
    return render_chat_template(template, messages, tools=tools, **specials)


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with a Jinja chat template (tokenizer.json directories; the GGUF
    BPE tokenizer is built into one). `decode` skips special tokens."""

    def __init__(
        self,
        tok: Any,
        *,
        bos_id: int | None,
        eos_ids: set[int],
        chat_template: str | None,
        special_tokens: dict[str, str] | None = None,
        name: str = "tokenizer",
    ):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self.has_chat_template = bool(chat_template)
        self.special_tokens = special_tokens or {}
        self.name = name
        decoder = tok.decoder.__getstate__() if tok.decoder is not None else b""
        self.byte_level = b'"ByteLevel"' in decoder  # a plain or nested ByteLevel decoder
        self._bytes: list[bytes] | None = None

    @classmethod
    def from_dir(cls, path: Path) -> HFTokenizer:
        """tokenizer.json + chat template and bos/eos from tokenizer_config.json/config.json."""
        import tokenizers

        try:
            tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"cannot read {path / 'tokenizer.json'}: {e}") from e
        config = _read_json(path / "tokenizer_config.json")
        model_config = _read_json(path / "config.json")
        generation = _read_json(path / "generation_config.json")

        def token_text(value: Any) -> str | None:
            return value.get("content") if isinstance(value, dict) else value

        specials = {
            k: text
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if isinstance(text := token_text(config.get(k)), str)
        }
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")

        def ids_of(*values: Any) -> set[int]:
            out = set()
            for v in values:
                for x in v if isinstance(v, list) else [v]:
                    if isinstance(x, int):
                        out.add(x)
                    elif isinstance(x, str) and (i := tok.token_to_id(x)) is not None:
                        out.add(i)
            return out

        eos_ids = ids_of(
            specials.get("eos_token"),
            model_config.get("eos_token_id"),
            generation.get("eos_token_id"),
        )
        bos = ids_of(specials.get("bos_token")) or ids_of(model_config.get("bos_token_id"))
        with_specials = tok.encode("a").ids
        adds_bos = len(with_specials) > len(tok.encode("a", add_special_tokens=False).ids)
        add_bos = config.get("add_bos_token", adds_bos and bool(bos) and with_specials[0] in bos)
        bos_id = min(bos) if add_bos and bos else None
        return cls(
            tok,
            bos_id=bos_id,
            eos_ids=eos_ids,
            chat_template=template if isinstance(template, str) else None,
            special_tokens=specials,
            name=str(path),
        )

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        if self.byte_level:
            table, n = self.byte_table(), self.vocab_size
            return b"".join(table[i] for i in ids if 0 <= i < n).decode("utf-8", "replace")
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        chat = check_messages(messages)
        if not self.chat_template:
            raise MixchatError(f"{self.name} has no chat template")
        text = render_chat_template(
            self.chat_template,
            [{"role": r, "content": c} for r, c in chat],
            **{**self.special_tokens, **current_template_options()},
        )
        return self.encode(text)

    def encode_tool_chat(self, messages: list[dict], tools: list | None) -> list[int]:
        text = render_tool_chat(self.chat_template, messages, tools, self.special_tokens, self.name)
        return self.encode(text)

    @cached_property
    def thinking_default(self) -> bool | None:
        """None unless the template switches thinking with ``enable_thinking``; then whether
        it thinks when the variable is not given (Qwen3's: yes)."""
        template = self.chat_template
        if not template or THINKING_SWITCH not in template:
            return None
        chat = [{"role": "user", "content": "Hi"}]
        try:
            plain = render_chat_template(template, chat, **self.special_tokens)
            on = render_chat_template(template, chat, **self.special_tokens, enable_thinking=True)
        except MixchatError:
            return None
        return plain == on

    def detokenizer(self) -> StreamingDetokenizer:
        """Streams `decode`; for gpt-oss's harmony vocabulary, only the `final` channel."""
        markers = harmony_markers(self.tok.token_to_id)
        if markers is not None:
            return HarmonyDetokenizer(self._plain_detokenizer, self.decode, markers)
        return self._plain_detokenizer()

    def _plain_detokenizer(self) -> StreamingDetokenizer:
        if self.byte_level:
            return ByteDetokenizer(self.byte_table())
        return WindowDetokenizer(self.decode)

    def byte_table(self) -> list[bytes]:
        """Per id, the bytes a byte-level decoder produces for it (b"" for special tokens)."""
        if self._bytes is None:
            byte_of = byte_decoder()
            special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
            table = []
            for i in range(self.vocab_size):
                token = self.tok.id_to_token(i)
                if i in special or token is None:
                    table.append(b"")
                elif all(c in byte_of for c in token):
                    table.append(bytes(byte_of[c] for c in token))
                else:
                    table.append(token.encode("utf-8"))
            self._bytes = table
        return self._bytes


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}
