"""Tiny random checkpoints for the tests, built with transformers as the reference definition.

Nothing here downloads anything: the models are random, the tokenizers are the real Mistral
SentencePiece files that ship inside the mistral-common wheel.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

MISTRAL_TOKENIZERS = {
    "v1": "tokenizer.model.v1",  # Mixtral 8x7B, Mistral 7B
    "v3": "mistral_instruct_tokenizer_240323.model.v3",  # Mixtral 8x22B
}
VOCAB_SIZES = {"v1": 32000, "v3": 32768}


def mistral_tokenizer_file(version: str = "v1") -> Path:
    """Path of a real Mistral tokenizer.model inside the installed mistral-common package."""
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "data" / MISTRAL_TOKENIZERS[version]


def build_hf_checkpoint(
    path: Path,
    arch: str = "mixtral",
    *,
    dtype: str = "float32",
    tokenizer: str = "v1",
    hidden_size: int = 64,
    intermediate_size: int = 96,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    num_experts: int = 4,
    top_k: int = 2,
    sliding_window: int | None = None,
    tie_word_embeddings: bool = False,
    rope_theta: float = 1e6,
    initializer_range: float = 0.2,
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Write a random Hugging Face checkpoint (config.json + safetensors + tokenizer.model).

    `arch` is "mixtral" (sparse MoE) or "mistral" (dense). A larger `initializer_range` than
    transformers' default makes router choices decisive, so logit comparisons are meaningful.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB_SIZES[tokenizer],
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        rope_theta=rope_theta,
        sliding_window=sliding_window,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        rms_norm_eps=1e-5,
    )
    if arch == "mixtral":
        config = transformers.MixtralConfig(
            num_local_experts=num_experts, num_experts_per_tok=top_k, **common
        )
        model = transformers.MixtralForCausalLM(config)
    elif arch == "mistral":
        config = transformers.MistralConfig(**common)
        model = transformers.MistralForCausalLM(config)
    else:
        raise ValueError(arch)
    # Norm weights start at exactly 1.0; perturb them so a missed norm shows up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(getattr(torch, dtype)).eval()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    shutil.copy(mistral_tokenizer_file(tokenizer), path / "tokenizer.model")
    return path


def quantized_moe(root: Path, num_layers: int, scales_dtype: str = "float16") -> Path:
    """An `num_layers`-layer, 8-expert top-2 Mixtral quantized to 4 bits by `mixchat quantize`
    (experts can stream), in root/q4."""
    from quantize.convert import Settings, convert
    from quantize.sources import open_source

    src = build_hf_checkpoint(root / "hf", "mixtral", num_experts=8, num_layers=num_layers,
                              intermediate_size=128)  # fmt: skip
    dst = root / "q4"
    convert(open_source(str(src)), dst, Settings(bits=4, group_size=32, dtype=scales_dtype),
            quiet=True)  # fmt: skip
    if not (dst / "tokenizer.model").exists():
        shutil.copy(src / "tokenizer.model", dst / "tokenizer.model")
    return dst


def reference_logits(path: Path, ids: list[int] | np.ndarray) -> np.ndarray:
    """Full causal forward of transformers' model on `ids` ([T] or [B, T]), in float32."""
    import torch
    import transformers

    config = json.loads((Path(path) / "config.json").read_text())
    cls = {
        "mixtral": transformers.MixtralForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "llama": transformers.LlamaForCausalLM,
    }[config["model_type"]]
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    x = torch.tensor(np.asarray(ids), dtype=torch.long)
    if x.ndim == 1:
        x = x[None]
    with torch.no_grad():
        return model(x).logits.float().numpy()


@functools.lru_cache(maxsize=2)
def gguf_reader(path: str):
    """gguf-py's GGUFReader of `path`, parsed once per session (seconds for a 49k vocabulary);
    read-only: the tests never write a GGUF file at a path they have read."""
    from gguf.gguf_reader import GGUFReader  # the class itself, not quick_gguf_reads' stand-in

    return GGUFReader(path)


@contextmanager
def quick_gguf_reads() -> Iterator[None]:
    """transformers' GGUF loader with gguf-py's two slow calls memoized while it runs: it parses
    the same file for the tokenizer, the config and the weights (GGUFReader, a read-only
    memory map), and rebuilds the same tensor-name map once per module (get_tensor_name_map).
    Memoizing changes no result; it spares the reference models ~15 s of setup."""
    import gguf
    import pytest

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", lambda path, mode="r": gguf_reader(str(path)))
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        yield
