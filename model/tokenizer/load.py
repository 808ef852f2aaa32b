"""`load_tokenizer`: the tokenizer of a model directory or of GGUF metadata."""

from __future__ import annotations

from pathlib import Path

from ..errors import MixchatError, UnsupportedModelError
from .base import Tokenizer
from .gguf_vocab import GGUFSentencePieceTokenizer, bpe_from_gguf
from .hf import HFTokenizer
from .sentencepiece import SentencePieceTokenizer


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
