"""Tokenizers: SentencePiece (Mistral/Mixtral), byte-level BPE from GGUF metadata, tokenizer.json.

    tok = load_tokenizer("/path/to/model_dir")        # or load_tokenizer(gguf_metadata_dict)
    ids = tok.encode_chat([{"role": "user", "content": "Bonjour"}])
    detok = tok.detokenizer()
    text = "".join(detok.add(t) for t in reply_ids) + detok.finish()   # == tok.decode(reply_ids)

Mistral chat prompts are built by hand to be token-for-token identical to mistral-common's
`MistralTokenizer.encode_chat_completion` (formats v1, v2/v3 and v7, detected from the vocabulary).
GGUF and tokenizer.json chat prompts come from the model's own Jinja chat template, rendered the
way transformers' `apply_chat_template` does.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from .errors import CheckpointError, MixchatError, UnsupportedModelError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SPACE = "\u2581"  # SentencePiece's visible space, "▁"
PIECE, CONTROL, UNKNOWN, BYTE = range(4)  # kinds of SentencePiece pieces


# ---------------------------------------------------------------------------------------------
# Interfaces


class StreamingDetokenizer:
    """Turns generated token ids into text one token at a time.

    `add` returns the text that became final with this token (possibly ""), never a partial
    multi-byte character; `finish` returns whatever was held back. The concatenation of every
    `add` output and `finish` equals `Tokenizer.decode(all_ids)`.
    """

    def add(self, token_id: int) -> str:
        raise NotImplementedError

    def finish(self) -> str:
        raise NotImplementedError


class Tokenizer:
    """Common interface of every tokenizer.

    `bos_id` is the id this format puts at the start of a prompt (None when it puts none there);
    `eos_ids` are the ids that end a reply. `encode` never adds BOS; `decode` drops control tokens.
    """

    bos_id: int | None
    eos_ids: set[int]
    vocab_size: int
    has_chat_template: bool = True  # False: encode_chat refuses; complete raw text instead

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids for `messages` (ending with a user message), ready for generation."""
        raise NotImplementedError

    def detokenizer(self) -> StreamingDetokenizer:
        raise NotImplementedError


def check_messages(messages: list[dict]) -> list[tuple[str, str]]:
    """Validate a chat (roles, string contents, ends with a user message) as (role, content)."""
    if not messages:
        raise MixchatError("the conversation has no messages")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES:
            raise MixchatError(f"message {i} has role {role!r}; expected system, user or assistant")
        if not isinstance(content, str):
            raise MixchatError(f"message {i} ({role}) has no text content")
        out.append((role, content))
    if out[-1][0] != "user":
        raise MixchatError(f"the last message must be a user message, not {out[-1][0]}")
    return out


# ---------------------------------------------------------------------------------------------
# SentencePiece (Mistral, Mixtral)


def _replace_per_byte(error: UnicodeDecodeError) -> tuple[str, int]:
    """One U+FFFD per invalid byte, as SentencePiece's byte-fallback decoding does."""
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error("mixchat.per_byte", _replace_per_byte)


class SentencePieceTokenizer(Tokenizer):
    """A Mistral `tokenizer.model`, driven with the sentencepiece library.

    `format` is "v1" ([INST] as text: Mistral 7B, Mixtral 8x7B), "v3" ([INST] control tokens,
    system prompt on the last user turn: Mixtral 8x22B; v2 files encode chats the same way) or
    "v7" ([SYSTEM_PROMPT] control tokens, system messages kept in place).
    """

    def __init__(self, path: str | Path, model_proto: bytes | None = None):
        """`path`: a tokenizer.model file, or only a name when `model_proto` (its bytes) is given."""
        import sentencepiece

        self.path = Path(path)
        try:
            if model_proto is not None:
                self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
            else:
                self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read SentencePiece model {self.path}: {e}") from e
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_ids = {sp.eos_id()} if sp.eos_id() >= 0 else set()
        self.eos_id = sp.eos_id()

        def control(piece: str) -> int | None:
            i = sp.piece_to_id(piece)
            return i if i != sp.unk_id() and sp.is_control(i) else None

        self.inst, self.end_inst = control("[INST]"), control("[/INST]")
        self.sys, self.end_sys = control("[SYSTEM_PROMPT]"), control("[/SYSTEM_PROMPT]")
        if self.inst is None or self.end_inst is None:
            self.format = "v1"
        elif self.sys is None or self.end_sys is None:
            self.format = "v3"
        else:
            self.format = "v7"
        # add_dummy_prefix: decoding drops the "▁" that encoding put in front of the text.
        first = sp.encode("a", out_type=str)
        self.strip_first_space = bool(first) and first[0].startswith(SPACE)
        self._table: tuple[list[str], list[int], list[int]] | None = None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """sentencepiece's decode; ids past the vocabulary (padded embeddings) are dropped."""
        return self.sp.decode([int(i) for i in ids if 0 <= i < self.vocab_size])

    def detokenizer(self) -> StreamingDetokenizer:
        return SentencePieceDetokenizer(self)

    def table(self) -> tuple[list[str], list[int], list[int]]:
        """Per id: surface text ("▁" as space), byte value (-1 if not a byte piece) and kind
        (PIECE, CONTROL, UNKNOWN or BYTE)."""
        if self._table is None:
            sp = self.sp
            surfaces, byte_values, kinds = [], [], []
            for i in range(self.vocab_size):
                piece = sp.id_to_piece(i)
                if sp.is_byte(i):
                    kind, surface = BYTE, ""
                elif sp.is_control(i):
                    kind, surface = CONTROL, ""
                elif sp.is_unknown(i):
                    kind, surface = UNKNOWN, " \u2047 "  # sentencepiece's default unk_surface
                else:
                    kind, surface = PIECE, piece.replace(SPACE, " ")
                surfaces.append(surface)
                byte_values.append(int(piece[3:5], 16) if kind == BYTE else -1)
                kinds.append(kind)
            self._table = surfaces, byte_values, kinds
        return self._table

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token-for-token what mistral-common's `encode_chat_completion` gives for a text chat.

        Like mistral-common: consecutive messages of the same role are merged with a blank line
        (empty ones skipped), system prompts are joined with a blank line and go into the first
        (v1) or last (v3) user message, or stay in place as [SYSTEM_PROMPT] blocks (v7); a chat
        not starting with a user message gets an empty one first (v1/v3); an assistant message
        must have content and must not be followed by a system message.
        """
        chat = check_messages(messages)
        for i, (role, content) in enumerate(chat):
            if role == "assistant" and not content:
                raise MixchatError(f"message {i} (assistant) is empty")
            if role == "system" and i > 0 and chat[i - 1][0] == "assistant":
                raise MixchatError(f"message {i}: a system message cannot follow an assistant one")
        v7 = self.format == "v7"

        # mistral-common's normalizer: runs of one role are merged; system messages are pulled
        # out (v1/v3) but still end the run they interrupt.
        turns: list[tuple[str, str]] = []
        start = 0
        for i in range(1, len(chat) + 1):
            if i < len(chat) and chat[i][0] == chat[start][0]:
                continue
            role, contents = chat[start][0], [c for _, c in chat[start:i]]
            if role != "system":
                turns.append((role, "\n\n".join(c for c in contents if c)))
            elif v7:
                turns.extend(("system", c) for c in contents)
            start = i
        system = None if v7 else "\n\n".join(c for r, c in chat if r == "system" and c) or None
        if not turns or (not v7 and turns[0][0] != "user"):
            turns.insert(0, ("user", ""))

        users = [i for i, (role, _) in enumerate(turns) if role == "user"]
        ids = [] if self.bos_id is None else [self.bos_id]
        for i, (role, text) in enumerate(turns):
            if role == "user" and self.format == "v1":
                if i == users[0] and system:
                    text = system + "\n\n" + text
                ids += self.sp.encode(f"[INST] {text} [/INST]")
            elif role == "user":
                if i == users[-1] and system:
                    text = system + "\n\n" + text
                ids += [self.inst, *self.sp.encode(text), self.end_inst]
            elif role == "assistant":
                ids += self.sp.encode(text if self.format == "v1" else text.rstrip(" "))
                ids.append(self.eos_id)
            else:
                ids += [self.sys, *self.sp.encode(text), self.end_sys]
        return ids


def mistral_format(tokenizer: SentencePieceTokenizer) -> str | None:
    """"v1"/"v3"/"v7" when the vocabulary is exactly one of Mistral's SentencePiece ones (the
    pieces' sha256 against MISTRAL_VOCABULARIES), else None."""
    import hashlib

    sp = tokenizer.sp
    digest = hashlib.sha256("\n".join(sp.id_to_piece(i) for i in range(sp.get_piece_size())).encode())
    return MISTRAL_VOCABULARIES.get(digest.hexdigest())


# sha256 of "\n".join(pieces) of the SentencePiece files in mistral-common's wheel (checked by
# tests/test_gguf.py): v1 (Mistral 7B, Mixtral 8x7B), v2, v3 (Mixtral 8x22B), v7.
MISTRAL_VOCABULARIES = {
    "9667493c598ed599f14df3157cb9a6f373d49a1b2d99d98c79e937ff490d219b": "v1",
    "cba649178f600969f57caf7932e2687d91886a505dc14ba5dbb8c8436717dcef": "v2",
    "67a66b4eabf037888c50af51b0dcf596774556d4fda1862c8251df55831702f1": "v3",
    "3f2bbe28b7ce6a9856017b4d1c3cd0a7a51adfd899a0b5b28e7a8a3a9334b412": "v7",
}


class GGUFSentencePieceTokenizer(SentencePieceTokenizer):
    """A SentencePiece vocabulary rebuilt from GGUF metadata (`tokenizer.ggml.model == "llama"`).

    Mistral's vocabularies encode chats as mistral-common does (the SentencePieceTokenizer
    encoder); any other uses the GGUF's chat template, its special tokens matched as text."""

    def __init__(self, meta: dict, name: str = "GGUF tokenizer"):
        super().__init__(name, model_proto=sentencepiece_proto(meta))
        self.name = name
        self.mistral = mistral_format(self)
        self.chat_template = meta.get("tokenizer.chat_template")
        self.has_chat_template = bool(self.mistral or self.chat_template)
        add_bos = _scalar(meta.get("tokenizer.ggml.add_bos_token", True))
        if not add_bos:
            self.bos_id = None
        eos = _scalar(meta.get("tokenizer.ggml.eos_token_id"))
        if eos is not None and 0 <= int(eos) < self.vocab_size:
            self.eos_ids = {int(eos)}
            self.eos_id = int(eos)
        sp = self.sp
        self.special_pieces = {
            sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if sp.is_control(i) or sp.is_unknown(i)
        }
        self.special_tokens = {
            key: sp.id_to_piece(i)
            for key, i in (("bos_token", sp.bos_id()), ("eos_token", self.eos_id),
                           ("unk_token", sp.unk_id()))
            if 0 <= i < self.vocab_size
        }

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if self.mistral:
            return super().encode_chat(messages)
        chat = check_messages(messages)
        if not self.chat_template:
            raise MixchatError(f"{self.name} has no chat template")
        text = _render_chat_template(
            self.chat_template, [{"role": r, "content": c} for r, c in chat], **self.special_tokens
        )
        return self.encode_with_specials(text)

    def encode_with_specials(self, text: str) -> list[int]:
        """Control tokens written as text ("<s>", "[INST]") become their ids; the text between
        them is encoded as usual."""
        import re

        if not self.special_pieces:
            return self.encode(text)
        pattern = "|".join(re.escape(p) for p in sorted(self.special_pieces, key=len, reverse=True))
        ids: list[int] = []
        pos = 0
        for m in re.finditer(pattern, text):
            if m.start() > pos:
                ids += self.encode(text[pos : m.start()])
            ids.append(self.special_pieces[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.encode(text[pos:])
        return ids


def sentencepiece_proto(meta: dict) -> bytes:
    """A SentencePiece BPE model (serialized ModelProto) from GGUF tokenizer metadata: pieces,
    scores and types as llama.cpp's converter wrote them from the original tokenizer.model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise CheckpointError("the GGUF tokenizer has no tokens")
    scores = meta.get("tokenizer.ggml.scores")
    scores = [float(x) for x in scores] if scores is not None else [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else [1] * len(tokens)
    if len(scores) != len(tokens) or len(types) != len(tokens):
        raise CheckpointError("the GGUF tokenizer's tokens, scores and token types differ in length")
    model = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        piece = model.pieces.add()
        piece.piece, piece.score = token, score
        # GGUF token types use SentencePiece's numbering (1 normal ... 6 byte)
        piece.type = kind if kind in (1, 2, 3, 4, 5, 6) else 1
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.byte_fallback = any(t == 6 for t in types)
    spec.vocab_size = len(tokens)

    def token_id(key: str, default: int) -> int:
        value = _scalar(meta.get(f"tokenizer.ggml.{key}"))
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else default

    unk = token_id("unknown_token_id", next((i for i, t in enumerate(types) if t == 2), 0))
    spec.unk_id, spec.bos_id = unk, token_id("bos_token_id", -1)
    spec.eos_id, spec.pad_id = token_id("eos_token_id", -1), token_id("padding_token_id", -1)
    if spec.pad_id in (spec.unk_id, spec.bos_id, spec.eos_id):
        spec.pad_id = -1
    spec.allow_whitespace_only_pieces = True
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(_scalar(meta.get("tokenizer.ggml.add_space_prefix", True)))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()


class SentencePieceDetokenizer(StreamingDetokenizer):
    """Streams `sp.decode` exactly: byte pieces go through an incremental UTF-8 decoder (one
    U+FFFD per invalid byte, a run of byte pieces ends at the next non-byte piece), control
    pieces vanish, and the first text piece loses its leading space (add_dummy_prefix)."""

    def __init__(self, tokenizer: SentencePieceTokenizer):
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
        out = self.finish() if self.pending else ""
        kind = self.kinds[token_id]
        if kind == CONTROL:
            return out
        surface = self.surfaces[token_id]
        if self.strip and kind == PIECE and surface.startswith(" "):
            surface = surface[1:]
        self.strip = False
        return out + surface

    def finish(self) -> str:
        self.pending = False
        out = self.utf8.decode(b"", final=True)
        self.utf8.reset()
        return out


# ---------------------------------------------------------------------------------------------
# tokenizers-based: byte-level BPE from GGUF metadata, tokenizer.json directories


@cache
def _byte_decoder() -> dict[str, int]:
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


def _render_chat_template(template: str, messages: list[dict], **extra: Any) -> str:
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
        text = _render_chat_template(
            self.chat_template, [{"role": r, "content": c} for r, c in chat], **self.special_tokens
        )
        return self.encode(text)

    def detokenizer(self) -> StreamingDetokenizer:
        if self.byte_level:
            return ByteDetokenizer(self.byte_table())
        return WindowDetokenizer(self.decode)

    def byte_table(self) -> list[bytes]:
        """Per id, the bytes a byte-level decoder produces for it (b"" for special tokens)."""
        if self._bytes is None:
            byte_of = _byte_decoder()
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


# llama.cpp's pre-tokenizer regexes, by `tokenizer.ggml.pre` (llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    # digits one by one, then GPT-2's regex
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"], "digits"
    ),
    **dict.fromkeys(["gpt2", "gpt-2", "default", "mpt", "olmo", "jais"], _GPT2_SPLIT),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _QWEN2_SPLIT),
}
# Control tokens that end a turn in the chat formats we know (llama.cpp's end-of-generation list).
_END_OF_TURN = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>"}


def _scalar(value: Any) -> Any:
    """A 0-d mx.array / numpy value from GGUF metadata as a Python scalar."""
    return value.item() if hasattr(value, "item") else value


def bpe_from_gguf(meta: dict) -> HFTokenizer:
    """Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) from GGUF metadata (`mx.load`'s)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types.tolist()] if types is not None else [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    # Tokens not spelled in GPT-2's byte alphabet are respelled (as transformers' converter does).
    alphabet = _byte_decoder()
    spell, letters = {b: c for c, b in alphabet.items()}, frozenset(alphabet)
    tokens = [
        t if letters.issuperset(t) else "".join(spell[b] for b in t.encode("utf-8")) for t in tokens
    ]
    tok = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))

    pre = meta.get("tokenizer.ggml.pre", "default")
    split = _PRE_SPLITS.get(pre)
    if split is None:
        log.warning("unknown GGUF pre-tokenizer %r; using GPT-2's", pre)
        split = _GPT2_SPLIT
    if split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    control = [i for i, t in enumerate(types) if t == 3]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    user_defined = [tokens[i] for i, t in enumerate(types) if t == 4]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

    def token_id(key: str) -> int | None:
        value = _scalar(meta.get(f"tokenizer.ggml.{key}"))
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    eos_ids = {
        i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None
    }
    eos_ids |= {i for i in control if tokens[i] in _END_OF_TURN}
    add_bos = bool(_scalar(meta.get("tokenizer.ggml.add_bos_token", False)))
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": token_id("unknown_token_id")}
    specials["pad_token"] = token_id("padding_token_id")
    return HFTokenizer(
        tok,
        bos_id=bos if add_bos else None,
        eos_ids=eos_ids,
        chat_template=meta.get("tokenizer.chat_template"),
        special_tokens={k: tokens[i] for k, i in specials.items() if i is not None},
        name=f"GGUF tokenizer {meta.get('general.name', '')}".strip(),
    )


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
        out = self.utf8.decode(b"", final=True)
        self.utf8.reset()
        return out


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
        new = (
            self.decode(self.ids)[len(self.context_text) :] if len(self.ids) > self.context else ""
        )
        self.ids, self.context, self.context_text = [], 0, ""
        return new


# ---------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def load_tokenizer(source: str | Path | dict | Tokenizer) -> Tokenizer:
    """A model directory (tokenizer.model, else tokenizer.json) or GGUF metadata -> Tokenizer."""
    if isinstance(source, Tokenizer):
        return source
    if isinstance(source, dict):
        kind = source.get("tokenizer.ggml.model")
        if kind == "gpt2":
            return bpe_from_gguf(source)
        if kind == "llama":
            return GGUFSentencePieceTokenizer(
                source, f"GGUF tokenizer {source.get('general.name', '')}".strip()
            )
        if kind is None:
            raise MixchatError("the GGUF file has no tokenizer (no tokenizer.ggml.model)")
        raise UnsupportedModelError(f"GGUF tokenizer type {kind!r} is not supported")

    path = Path(source)
    if not path.is_dir():
        raise MixchatError(f"cannot load a tokenizer from {path}: not a directory")
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path / "tokenizer.model")
    versioned = sorted(path.glob("tokenizer.model.v*"))  # mistral-format repos
    if versioned:
        return SentencePieceTokenizer(versioned[-1])
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(path)
    if (path / "tekken.json").is_file():
        raise UnsupportedModelError(f"{path}: Tekken tokenizers (tekken.json) are not supported")
    raise MixchatError(f"no tokenizer in {path} (expected tokenizer.model or tokenizer.json)")
