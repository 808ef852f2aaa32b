"""SentencePiece tokenizers (Mistral, Mixtral) and Mistral's chat formats (v1, v3, v7).

Mistral chat prompts are built by hand to be token-for-token identical to mistral-common's
`MistralTokenizer.encode_chat_completion` (formats v1, v2/v3 and v7, detected from the vocabulary).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import CheckpointError, MixchatError
from .base import StreamingDetokenizer, Tokenizer, check_messages
from .detokenizers import BYTE, CONTROL, PIECE, UNKNOWN, SentencePieceDetokenizer

SPACE = "\u2581"  # SentencePiece's visible space, "▁"


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

    def encode_tool_chat(self, messages: list[dict], tools: list | None) -> list[int]:
        """mistral-common's ids for a chat with tools (v3, v7; see mistral_tools); it may end
        with any role."""
        return self.encode_tool_turns(messages, tools)[0]

    def encode_tool_turns(self, messages: list[dict],
                          tools: list | None) -> tuple[list[int], list[tuple[int, int, int]]]:  # fmt: skip
        """encode_tool_chat's ids, and (first message index, start, end) per assistant turn."""
        from .mistral_tools import encode_tool_turns

        return encode_tool_turns(self, messages, tools)

    def mistral_version(self) -> str | None:
        """mistral_format(self), computed once."""
        if not hasattr(self, "_mistral_version"):
            self._mistral_version = mistral_format(self)
        return self._mistral_version

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
