"""One model's tensors under mlx-lm's names, read lazily, a module or one expert at a time, for
the streamed evaluation (quantize/evaluate.py).

`SourceWeights` reads what `mixchat quantize` reads (Hugging Face and Mistral float checkpoints,
quantize/sources.py); `CheckpointWeights` what mixchat's loader reads (MLX-quantized directories,
GGUF files, model/weights.py). `open_weights` picks one for a model argument.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx

from model.config import ModelArgs
from model.errors import CheckpointError
from model.names import EXPERT_MARK, EXPERT_PROJECTIONS, PARTS, PER_EXPERT_MARK, expert_tensor
from model.safetensors_header import read_safetensors_header
from model.weights import Checkpoint, compute_dtype


class Weights:
    """One model's tensors under mlx-lm's names, read lazily and only when asked for."""

    name: str
    args: ModelArgs
    dtype: mx.Dtype  # compute dtype

    def take(self, prefix: str) -> dict[str, mx.array]:
        """Every tensor of module `prefix` and its children, MoE experts excepted (lazy)."""
        raise NotImplementedError

    def take_expert(self, layer: int, expert: int) -> dict[str, mx.array]:
        """Expert `expert` of layer `layer`: `...switch_mlp.{proj}.{part}` with a leading 1."""
        raise NotImplementedError


def _under(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".")


class SourceWeights(Weights):
    """A float checkpoint as `mixchat quantize` reads it (quantize.sources.Source)."""

    def __init__(self, source: Any, dtype: str | None = None):
        self.name = str(source.path)
        self.args = source.args
        self.targets = {t.module: t for t in source.targets}
        self.dtype = compute_dtype(SimpleNamespace(source_dtype=source.dtype), dtype)

    def take(self, prefix: str) -> dict[str, mx.array]:
        return {
            t.tensor: t.load()
            for m, t in self.targets.items()
            if (m == prefix or _under(m, prefix)) and t.kind != "experts"
        }

    def take_expert(self, layer: int, expert: int) -> dict[str, mx.array]:
        out = {}
        for proj in EXPERT_PROJECTIONS:
            name = expert_tensor(layer, proj)
            out[name] = self.targets[name.removesuffix(".weight")].load_expert(expert)
        return out


class CheckpointWeights(Weights):
    """A checkpoint as mixchat's loader reads it (model.weights.Checkpoint): HF or MLX
    (quantized) safetensors, or GGUF. Each tensor comes from a fresh lazy `mx.load`, so nothing
    read stays referenced once its module is freed."""

    def __init__(self, checkpoint: Checkpoint, dtype: str | None = None):
        self.name = str(checkpoint.path)
        self.args = checkpoint.args
        self.checkpoint = checkpoint
        self.dtype = compute_dtype(checkpoint, dtype)
        self.files: dict[str, Path] = {}
        if checkpoint.gguf_file is None:
            for file in checkpoint.files:
                self.files.update(dict.fromkeys(read_safetensors_header(file), file))
            names = set(self.files)
        else:
            names = set(checkpoint.tensors)  # converted names: weight, scales, biases
        self.names = {n for n in names if "rotary_emb.inv_freq" not in n}
        if self.args.tie_word_embeddings:
            self.names = {n for n in self.names if not n.startswith("lm_head.")}

    def _read(self, name: str) -> mx.array:
        if self.checkpoint.gguf_file is not None:
            return self._read_gguf(name)
        try:
            return mx.load(str(self.files[name]))[name]
        except Exception as e:
            raise CheckpointError(f"cannot read {self.files[name].name}: {e}") from None

    def _read_gguf(self, name: str) -> mx.array:
        """One converted part of one GGUF tensor (model.gguf converts a tensor at a time)."""
        import numpy as np

        from model.gguf import load_tensor

        base, part = name.rsplit(".", 1)
        if part in ("scales", "biases"):  # converted parts of a quantized weight
            tensor, _ = self.checkpoint.gguf_names[f"{base}.weight"]
        else:  # a tensor of its own: a weight, or a bias (PhiMoE's)
            tensor, part = self.checkpoint.gguf_names[name][0], "weight"
        array = load_tensor(self.checkpoint.gguf_file, tensor)[part]
        if array.dtype == np.uint16:  # BF16 bit patterns
            return mx.array(array).view(mx.bfloat16)
        return mx.array(array)

    def take(self, prefix: str) -> dict[str, mx.array]:
        return {
            n: self._read(n)
            for n in sorted(self.names)
            if _under(n, prefix) and EXPERT_MARK not in n and PER_EXPERT_MARK not in n
        }

    def take_expert(self, layer: int, expert: int) -> dict[str, mx.array]:
        out = {}
        for proj in EXPERT_PROJECTIONS:
            for part in PARTS:
                single = expert_tensor(layer, proj, part, expert)  # Hugging Face: one per expert
                stacked = expert_tensor(layer, proj, part)  # mlx-lm, GGUF: [E, out, in]
                if single in self.names:
                    out[stacked] = self._read(single)[None]
                elif stacked in self.names:
                    out[stacked] = self._read(stacked)[expert : expert + 1]
        return out


def open_weights(spec: str, dtype: str | None = None) -> tuple[Weights, Any]:
    """A model argument (path or cached repo id) -> (its Weights, its tokenizer).

    Float Hugging Face and Mistral-format checkpoints are read as `mixchat quantize` reads them
    (every tensor's name and shape checked first); quantized directories and GGUF files as
    mixchat's loader reads them."""
    from model.registry import resolve
    from model.tokenizer import load_tokenizer
    from model.weights import locate

    from .sources import open_source

    path = resolve(spec)
    if path.is_dir() and not _is_quantized_dir(path) and _quantizes(path):
        source = open_source(path)
        return SourceWeights(source, dtype), load_tokenizer(path)
    checkpoint = locate(path)
    tokenizer = load_tokenizer(
        checkpoint.gguf_metadata if checkpoint.format == "gguf" else checkpoint.path
    )
    return CheckpointWeights(checkpoint, dtype), tokenizer


def _quantizes(path: Path) -> bool:
    """False for a float checkpoint `mixchat quantize` does not convert (gpt_oss): read as the
    loader reads it."""
    import json

    from model.config import FAMILY_TYPES, QUANTIZE_TYPES

    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return True  # open_source gives the one-line error
    return model_type not in FAMILY_TYPES or model_type in QUANTIZE_TYPES


def _is_quantized_dir(path: Path) -> bool:
    import json

    config = path / "config.json"
    if not config.is_file():
        return not (path / "params.json").is_file()  # a GGUF directory, or an error from locate
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False  # open_source gives the one-line error
    return isinstance(data, dict) and bool(
        data.get("quantization") or data.get("quantization_config")
    )
