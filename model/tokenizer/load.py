"""`load_tokenizer`: the tokenizer of a model directory or of GGUF metadata."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MixchatError, UnsupportedModelError
from .base import Tokenizer
from .gguf_vocab import GGUFSentencePieceTokenizer, bpe_from_gguf
from .hf import HFTokenizer
from .sentencepiece import SentencePieceTokenizer

# A GGUF's tokenizer metadata, kept by `mixchat quantize MODEL.gguf DIR` (quantize/gguf_dir.py).
GGUF_TOKENIZER_FILE = "tokenizer_gguf.json"


def load_tokenizer(source: str | Path | dict | Tokenizer) -> Tokenizer:
    """A model directory (a GGUF's tokenizer metadata, tokenizer.model, else tokenizer.json) or
    GGUF metadata -> Tokenizer."""
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
    if (path / GGUF_TOKENIZER_FILE).is_file():
        try:
            metadata = json.loads((path / GGUF_TOKENIZER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise MixchatError(f"cannot read {path / GGUF_TOKENIZER_FILE}: {e}") from None
        return load_tokenizer(metadata)
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
