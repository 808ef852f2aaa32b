"""Tokenizers: SentencePiece (Mistral/Mixtral), byte-level BPE from GGUF metadata, tokenizer.json.

    tok = load_tokenizer("/path/to/model_dir")        # or load_tokenizer(gguf_metadata_dict)
    ids = tok.encode_chat([{"role": "user", "content": "Bonjour"}])
    detok = tok.detokenizer()
    text = "".join(detok.add(t) for t in reply_ids) + detok.finish()
    # == tok.decode(reply_ids), less a last character the ids leave incomplete (U+FFFD there)

base.py: the interfaces; sentencepiece.py: SentencePiece and Mistral's chat formats (token for
token as mistral-common); gguf_vocab.py: vocabularies rebuilt from GGUF metadata; hf.py:
tokenizer.json and Jinja chat templates; detokenizers.py: streaming detokenizers; load.py:
load_tokenizer.
"""

from .base import ROLES, StreamingDetokenizer, Tokenizer, check_messages
from .detokenizers import (
    BYTE,
    CONTROL,
    PIECE,
    UNKNOWN,
    ByteDetokenizer,
    SentencePieceDetokenizer,
    WindowDetokenizer,
)
from .gguf_vocab import GGUFSentencePieceTokenizer, bpe_from_gguf, sentencepiece_proto
from .hf import HFTokenizer
from .load import load_tokenizer
from .sentencepiece import MISTRAL_VOCABULARIES, SPACE, SentencePieceTokenizer, mistral_format

__all__ = [
    "BYTE",
    "CONTROL",
    "MISTRAL_VOCABULARIES",
    "PIECE",
    "ROLES",
    "SPACE",
    "UNKNOWN",
    "ByteDetokenizer",
    "GGUFSentencePieceTokenizer",
    "HFTokenizer",
    "SentencePieceDetokenizer",
    "SentencePieceTokenizer",
    "StreamingDetokenizer",
    "Tokenizer",
    "WindowDetokenizer",
    "bpe_from_gguf",
    "check_messages",
    "load_tokenizer",
    "mistral_format",
    "sentencepiece_proto",
]
