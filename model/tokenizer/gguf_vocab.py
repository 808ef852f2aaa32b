"""Tokenizers rebuilt from GGUF metadata: a SentencePiece model from the tokens, scores and types
(`tokenizer.ggml.model == "llama"`), or a byte-level BPE (`"gpt2"`) with llama.cpp's
pre-tokenizer."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import CheckpointError, MixchatError
from .base import check_messages
from .hf import HFTokenizer, byte_decoder, render_chat_template, render_tool_chat
from .sentencepiece import SentencePieceTokenizer, mistral_format

log = logging.getLogger(__name__)


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
        text = render_chat_template(
            self.chat_template, [{"role": r, "content": c} for r, c in chat], **self.special_tokens
        )
        return self.encode_with_specials(text)

    def encode_tool_chat(self, messages: list[dict], tools: list | None) -> list[int]:
        if self.mistral:
            return super().encode_tool_chat(messages, tools)
        text = render_tool_chat(self.chat_template, messages, tools, self.special_tokens, self.name)
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
# OpenAI's o200k (gpt-4o, gpt-oss): llama.cpp's "gpt-4o", tiktoken's o200k_base pattern.
_GPT4O_SPLIT = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
])  # fmt: skip
# DeepSeek-V3's three splits, applied in turn (its tokenizer.json's Sequence of Splits).
_DEEPSEEK3_SPLITS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_PRE_SPLITS = {
    # digits one by one, then GPT-2's regex
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"], "digits"
    ),
    **dict.fromkeys(["gpt2", "gpt-2", "default", "mpt", "olmo", "jais"], _GPT2_SPLIT),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _QWEN2_SPLIT),
    "gpt-4o": _GPT4O_SPLIT,
    "deepseek-v3": _DEEPSEEK3_SPLITS,
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
    types = [1] * len(tokens) if types is None else [int(t) for t in types]  # array or list
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    # Tokens not spelled in GPT-2's byte alphabet are respelled (as transformers' converter does).
    alphabet = byte_decoder()
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
    else:  # one regex, or several applied in turn
        splits = (split,) if isinstance(split, str) else split
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
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
