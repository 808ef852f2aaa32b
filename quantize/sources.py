"""Read Hugging Face or Mistral-format checkpoints tensor by tensor, never unpickling anything.

`open_source(src)` checks everything that can be checked before a byte of output is written
(config, architecture, every shard's safetensors header and size, every tensor's shape against
the config) and returns a `Source`: the HF-style config to write and a list of `Target`s, one
per output module in mlx-lm's naming, each knowing which source tensors it is built from.
Tensors are only read later, lazily, one target at a time (`Target.load`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from model.errors import CheckpointError, UnsupportedModelError
from model.safetensors_header import PICKLE_SUFFIXES, read_safetensors_header

SUPPORTED_TYPES = ("mixtral", "mistral", "llama")
# safetensors dtype -> (MLX dtype name, bytes per element)
FLOAT_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}
# Tokenizer and generation files copied next to the quantized weights.
HF_EXTRA_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SHARD_NAME = re.compile(r"^(.*)-(\d+)-of-(\d+)\.safetensors$")


@dataclass(frozen=True)
class TensorRef:
    """One tensor inside one safetensors file."""

    file: Path
    name: str
    dtype: str  # safetensors dtype: "BF16", "F16", "F32"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        size = FLOAT_DTYPES[self.dtype][1]
        for d in self.shape:
            size *= d
        return size


def _single(arrays: list) -> Any:
    return arrays[0]


def _stack(arrays: list) -> Any:
    import mlx.core as mx

    return mx.stack(arrays)


def _permute_rope(arrays: list, heads: int) -> Any:
    """Mistral's interleaved-pair RoPE layout -> HF's rotate-half layout (as HF's converter does)."""
    w = arrays[0]
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _split_experts(arrays: list, experts: int, transpose: bool) -> Any:
    """Mistral's first Mixtral release stacks experts along rows: [E*F, H] -> [E, F, H]."""
    w = arrays[0]
    w = w.reshape(experts, w.shape[0] // experts, w.shape[1])
    return w.swapaxes(1, 2) if transpose else w


@dataclass
class Target:
    """One output module (mlx-lm naming) and the source tensors it is assembled from."""

    module: str  # e.g. "model.layers.0.block_sparse_moe.switch_mlp.gate_proj"
    kind: str  # "embed" | "attn" | "router" | "experts" | "mlp" | "norm" | "head"
    shape: tuple[int, ...]  # shape of the assembled full-precision weight
    refs: list[TensorRef]
    assemble: Callable[[list], Any] = _single

    @property
    def source_bytes(self) -> int:
        return sum(r.nbytes for r in self.refs)

    def load(self) -> Any:
        """The assembled weight as a lazy mx.array (nothing is read until it is evaluated)."""
        import mlx.core as mx

        # A fresh mx.load per tensor: no dictionary keeps evaluated tensors alive afterwards.
        return self.assemble([mx.load(str(r.file))[r.name] for r in self.refs])

    def load_expert(self, expert: int) -> Any:
        """Expert `expert` of an "experts" target, [1, out, in], lazily; where the source stores
        experts separately only that expert's tensor is read."""
        import mlx.core as mx

        if self.assemble is _stack:
            ref = self.refs[expert]
            return mx.load(str(ref.file))[ref.name][None]
        return self.load()[expert : expert + 1]


@dataclass
class Source:
    path: Path
    format: str  # "hf" | "mistral"
    config: dict[str, Any]  # Hugging Face-style config.json content (no quantization block)
    dtype: str  # dominant floating dtype of the weights: "bfloat16" | "float16" | "float32"
    shards: list[Path]
    targets: list[Target]
    extra_files: dict[str, Path] = field(default_factory=dict)  # name in DST -> source file

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def total_bytes(self) -> int:
        return sum(t.source_bytes for t in self.targets)

    @property
    def num_params(self) -> int:
        n = 0
        for t in self.targets:
            size = 1
            for d in t.shape:
                size *= d
            n += size
        return n


# ----------------------------------------------------------------------------- locating


def resolve_source(src: str) -> Path:
    """A local directory, or a repo id already in the local Hugging Face cache."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{src} is a file; SRC must be a model directory or a repo id")
        return path
    if not REPO_ID.match(src):
        raise CheckpointError(f"{src}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, IncompleteSnapshotError, bad repo id, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "incomplete" in reason.lower():
            raise CheckpointError(
                f"{src}: the cached copy is incomplete; run `mixchat download {src}` to finish it"
            ) from None
        raise CheckpointError(
            f"{src}: no such directory, and not in the local Hugging Face cache "
            f"(run `mixchat download {src}` first)"
        ) from None


# ----------------------------------------------------------------------------- safetensors


def read_header(path: Path) -> dict[str, TensorRef]:
    """Parse a safetensors header (model.weights checks it is well-formed and not truncated);
    every tensor must be a float one with consistent byte offsets."""
    tensors: dict[str, TensorRef] = {}
    for name, spec in read_safetensors_header(path).items():
        if spec.dtype not in FLOAT_DTYPES:
            raise UnsupportedModelError(
                f"{path.name}: tensor {name} has dtype {spec.dtype}; mixchat quantizes float16, "
                "bfloat16 or float32 checkpoints (is this one already quantized?)"
            )
        ref = TensorRef(path, name, spec.dtype, spec.shape)
        if spec.nbytes != ref.nbytes:
            raise CheckpointError(f"{path.name}: tensor {name} has inconsistent byte offsets")
        tensors[name] = ref
    return tensors


def _shard_files(path: Path, index_name: str, pattern: str) -> list[Path]:
    """Shard files from an index's weight_map if there is one, else by glob; all must exist."""
    index = path / index_name
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index_name} is unreadable or has no weight_map") from None
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(p.name for p in path.glob(pattern))
        # "model-00002-of-00004.safetensors": all four parts must be there.
        for m in [SHARD_NAME.match(n) for n in names]:
            if m:
                prefix, width, total = m.group(1), len(m.group(2)), m.group(3)
                names += [
                    f"{prefix}-{i:0{width}d}-of-{total}.safetensors"
                    for i in range(1, int(total) + 1)
                ]
        names = sorted(set(names))
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing shard {missing[0]}{more} in {path}")
    return [path / n for n in names]


def _index_tensors(shards: list[Path]) -> dict[str, TensorRef]:
    tensors: dict[str, TensorRef] = {}
    for shard in shards:
        for name, ref in read_header(shard).items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name} appears in both {tensors[name].file.name} and {shard.name}"
                )
            tensors[name] = ref
    return tensors


def _dominant_dtype(tensors: dict[str, TensorRef]) -> str:
    by_dtype: dict[str, int] = {}
    for ref in tensors.values():
        by_dtype[ref.dtype] = by_dtype.get(ref.dtype, 0) + ref.nbytes
    return FLOAT_DTYPES[max(by_dtype, key=by_dtype.__getitem__)][0]


def _refuse_pickles(path: Path) -> None:
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} holds only PyTorch pickle weights ({pickles[0]}); mixchat never unpickles "
            "files: use the model's safetensors release"
        )


# ----------------------------------------------------------------------------- opening


def open_source(src: str | Path) -> Source:
    """Locate and fully validate a checkpoint (HF directory, cached repo id, or Mistral format)."""
    path = resolve_source(str(src))
    if (path / "config.json").is_file():
        return _open_hf(path)
    if (path / "params.json").is_file():
        return _open_mistral(path)
    if any(path.glob("*.safetensors")):
        raise CheckpointError(f"missing config.json in {path}")
    _refuse_pickles(path)
    raise CheckpointError(f"{path} is not a model checkpoint (no config.json or params.json)")


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} is not a JSON object")
    return data


@dataclass
class Dims:
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int  # 0 for dense
    top_k: int
    tie: bool


def _int(config: dict, key: str, file: str, default: Any = None) -> int:
    value = config.get(key)
    if value is None:
        value = default
    if value is None:
        raise CheckpointError(f"{file} lacks required field '{key}'")
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{file}: '{key}' is not an integer ({value!r})") from None
    if value <= 0:
        raise CheckpointError(f"{file}: '{key}' must be positive (got {value})")
    return value


def _check_dims(d: Dims, file: str) -> None:
    if d.heads % d.kv_heads:
        raise CheckpointError(
            f"{file}: {d.heads} attention heads is not a multiple of {d.kv_heads} KV heads"
        )
    if d.head_dim % 2:
        raise CheckpointError(f"{file}: head dimension {d.head_dim} is odd")
    if d.experts and not 0 < d.top_k <= d.experts:
        raise CheckpointError(f"{file}: {d.top_k} experts per token but only {d.experts} experts")


def _open_hf(path: Path) -> Source:
    config = _load_json(path / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        arch = (config.get("architectures") or [model_type or "unknown"])[0]
        raise UnsupportedModelError(
            f"unsupported architecture '{model_type or arch}' (mixchat quantizes "
            f"{', '.join(SUPPORTED_TYPES)} checkpoints)"
        )
    if config.get("quantization") or config.get("quantization_config"):
        raise UnsupportedModelError(f"{path} is already quantized; quantize the original weights")
    heads = _int(config, "num_attention_heads", "config.json")
    hidden = _int(config, "hidden_size", "config.json")
    d = Dims(
        vocab=_int(config, "vocab_size", "config.json"),
        hidden=hidden,
        ffn=_int(config, "intermediate_size", "config.json"),
        layers=_int(config, "num_hidden_layers", "config.json"),
        heads=heads,
        kv_heads=_int(config, "num_key_value_heads", "config.json", heads),
        head_dim=_int(config, "head_dim", "config.json", hidden // heads),
        experts=_int(config, "num_local_experts", "config.json") if model_type == "mixtral" else 0,
        top_k=_int(config, "num_experts_per_tok", "config.json", 2)
        if model_type == "mixtral"
        else 0,
        tie=bool(config.get("tie_word_embeddings", False)),
    )
    _check_dims(d, "config.json")
    if not any(path.glob("*.safetensors")):
        _refuse_pickles(path)
        raise CheckpointError(f"no safetensors weights in {path}")
    shards = _shard_files(path, "model.safetensors.index.json", "model*.safetensors")
    if not shards:
        shards = sorted(
            p for p in path.glob("*.safetensors") if not p.name.startswith("consolidated")
        )
    if not shards:
        raise CheckpointError(f"no model*.safetensors weights in {path}")
    tensors = _index_tensors(shards)
    targets = _hf_targets(d, _Lookup(tensors, "config.json"))
    out = dict(config)
    rope = out.get("rope_parameters") or {}
    if "rope_theta" not in out and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]  # mlx-lm reads the top-level key
    extra = {n: path / n for n in HF_EXTRA_FILES if (path / n).is_file()}
    _require_tokenizer(path, extra)
    return Source(path, "hf", out, _dominant_dtype(tensors), shards, targets, extra)


def _require_tokenizer(path: Path, extra: dict[str, Path]) -> None:
    if not any(n in extra for n in ("tokenizer.model", "tokenizer.json", "tekken.json")):
        raise CheckpointError(f"no tokenizer in {path} (tokenizer.model or tokenizer.json)")


class _Lookup:
    """Finds expected tensors by name and checks their shapes against the config."""

    def __init__(self, tensors: dict[str, TensorRef], config_file: str):
        self.tensors = tensors
        self.config_file = config_file
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __call__(self, name: str, shape: tuple[int, ...]) -> TensorRef:
        ref = self.tensors.get(name)
        if ref is None:
            raise CheckpointError(f"checkpoint lacks tensor {name}")
        if ref.shape != shape:
            raise CheckpointError(
                f"tensor {name} has shape {list(ref.shape)} but {self.config_file} "
                f"implies {list(shape)}"
            )
        self.used.add(name)
        return ref

    def check_unused(self, allowed: Callable[[str], bool] = lambda _: False) -> None:
        extra = [
            n
            for n in self.tensors
            if n not in self.used and not IGNORED_TENSORS.match(n) and not allowed(n)
        ]
        if extra:
            raise UnsupportedModelError(
                f"unexpected tensor {extra[0]} ({len(extra)} unexpected in all): this checkpoint "
                "does not match its declared architecture"
            )


def _hf_targets(d: Dims, get: _Lookup) -> list[Target]:
    H, F = d.hidden, d.ffn
    q_dim, kv_dim = d.heads * d.head_dim, d.kv_heads * d.head_dim
    targets = [
        Target(
            "model.embed_tokens",
            "embed",
            (d.vocab, H),
            [get("model.embed_tokens.weight", (d.vocab, H))],
        )
    ]
    for i in range(d.layers):
        p = f"model.layers.{i}"
        targets.append(
            Target(f"{p}.input_layernorm", "norm", (H,), [get(f"{p}.input_layernorm.weight", (H,))])
        )
        for proj, shape in (
            ("q_proj", (q_dim, H)),
            ("k_proj", (kv_dim, H)),
            ("v_proj", (kv_dim, H)),
            ("o_proj", (H, q_dim)),
        ):
            targets.append(
                Target(
                    f"{p}.self_attn.{proj}",
                    "attn",
                    shape,
                    [get(f"{p}.self_attn.{proj}.weight", shape)],
                )
            )
        targets.append(
            Target(
                f"{p}.post_attention_layernorm",
                "norm",
                (H,),
                [get(f"{p}.post_attention_layernorm.weight", (H,))],
            )
        )
        if d.experts:
            moe = f"{p}.block_sparse_moe"
            E = d.experts
            targets.append(
                Target(f"{moe}.gate", "router", (E, H), [get(f"{moe}.gate.weight", (E, H))])
            )
            for w, proj, shape in (
                ("w1", "gate_proj", (F, H)),
                ("w3", "up_proj", (F, H)),
                ("w2", "down_proj", (H, F)),
            ):
                refs = [get(f"{moe}.experts.{e}.{w}.weight", shape) for e in range(E)]
                targets.append(
                    Target(f"{moe}.switch_mlp.{proj}", "experts", (E, *shape), refs, _stack)
                )
        else:
            for proj, shape in (("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F))):
                targets.append(
                    Target(f"{p}.mlp.{proj}", "mlp", shape, [get(f"{p}.mlp.{proj}.weight", shape)])
                )
    targets.append(Target("model.norm", "norm", (H,), [get("model.norm.weight", (H,))]))
    if not d.tie:
        targets.append(
            Target("lm_head", "head", (d.vocab, H), [get("lm_head.weight", (d.vocab, H))])
        )
    get.check_unused(lambda n: d.tie and n == "lm_head.weight")
    return targets


# ----------------------------------------------------------------------------- Mistral format


def _open_mistral(path: Path) -> Source:
    params = _load_json(path / "params.json")
    if not any(path.glob("*.safetensors")):
        _refuse_pickles(path)
        raise CheckpointError(f"no safetensors weights in {path}")
    shards = _shard_files(path, "consolidated.safetensors.index.json", "consolidated*.safetensors")
    if not shards:
        raise CheckpointError(f"no consolidated*.safetensors weights in {path}")
    tensors = _index_tensors(shards)
    moe = params.get("moe") or {}
    heads = _int(params, "n_heads", "params.json")
    dim = _int(params, "dim", "params.json")
    vocab = params.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:  # some early params.json files say -1
        if "tok_embeddings.weight" not in tensors:
            raise CheckpointError("checkpoint lacks tensor tok_embeddings.weight")
        vocab = tensors["tok_embeddings.weight"].shape[0]
    d = Dims(
        vocab=vocab,
        hidden=dim,
        ffn=_int(params, "hidden_dim", "params.json"),
        layers=_int(params, "n_layers", "params.json"),
        heads=heads,
        kv_heads=_int(params, "n_kv_heads", "params.json", heads),
        head_dim=_int(params, "head_dim", "params.json", dim // heads),
        experts=_int(moe, "num_experts", "params.json") if moe else 0,
        top_k=_int(moe, "num_experts_per_tok", "params.json", 2) if moe else 0,
        tie=False,
    )
    _check_dims(d, "params.json")
    targets = _mistral_targets(d, _Lookup(tensors, "params.json"))
    dtype = _dominant_dtype(tensors)
    config: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if d.experts else "MistralForCausalLM"],
        "model_type": "mixtral" if d.experts else "mistral",
        "vocab_size": d.vocab,
        "hidden_size": d.hidden,
        "intermediate_size": d.ffn,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(params.get("norm_eps", 1e-5)),
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "max_position_embeddings": int(
            params.get("max_seq_len") or params.get("max_position_embeddings") or 32768
        ),
        "sliding_window": params.get("sliding_window"),
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }
    if d.experts:
        config["num_local_experts"] = d.experts
        config["num_experts_per_tok"] = d.top_k
    extra: dict[str, Path] = {}
    sp = sorted(path.glob("tokenizer.model*"))  # tokenizer.model, tokenizer.model.v3, ...
    if sp:
        extra["tokenizer.model"] = sp[0]
    if (path / "tekken.json").is_file():
        extra["tekken.json"] = path / "tekken.json"
    _require_tokenizer(path, extra)
    return Source(path, "mistral", config, dtype, shards, targets, extra)


def _mistral_targets(d: Dims, get: _Lookup) -> list[Target]:
    H, F, E = d.hidden, d.ffn, d.experts
    q_dim, kv_dim = d.heads * d.head_dim, d.kv_heads * d.head_dim
    targets = [
        Target(
            "model.embed_tokens",
            "embed",
            (d.vocab, H),
            [get("tok_embeddings.weight", (d.vocab, H))],
        )
    ]
    # Which of Mistral's MoE layouts: per-expert modules under feed_forward or block_sparse_moe,
    # or the first release's experts stacked along rows in block_sparse_moe.w1/w2/w3.
    moe_prefix = "feed_forward"
    stacked = False
    if E:
        if "layers.0.block_sparse_moe.w1" in get:
            moe_prefix, stacked = "block_sparse_moe", True
        elif "layers.0.block_sparse_moe.experts.0.w1.weight" in get:
            moe_prefix = "block_sparse_moe"
    for i in range(d.layers):
        p = f"layers.{i}"
        out = f"model.layers.{i}"
        targets.append(
            Target(
                f"{out}.input_layernorm", "norm", (H,), [get(f"{p}.attention_norm.weight", (H,))]
            )
        )
        for w, proj, shape, heads in (
            ("wq", "q_proj", (q_dim, H), d.heads),
            ("wk", "k_proj", (kv_dim, H), d.kv_heads),
            ("wv", "v_proj", (kv_dim, H), 0),
            ("wo", "o_proj", (H, q_dim), 0),
        ):
            assemble = partial(_permute_rope, heads=heads) if heads else _single
            ref = get(f"{p}.attention.{w}.weight", shape)
            targets.append(Target(f"{out}.self_attn.{proj}", "attn", shape, [ref], assemble))
        targets.append(
            Target(
                f"{out}.post_attention_layernorm", "norm", (H,), [get(f"{p}.ffn_norm.weight", (H,))]
            )
        )
        if E:
            moe = f"{p}.{moe_prefix}"
            dst = f"{out}.block_sparse_moe"
            targets.append(
                Target(f"{dst}.gate", "router", (E, H), [get(f"{moe}.gate.weight", (E, H))])
            )
            for w, proj, shape in (
                ("w1", "gate_proj", (F, H)),
                ("w3", "up_proj", (F, H)),
                ("w2", "down_proj", (H, F)),
            ):
                if stacked:
                    ref = get(f"{moe}.{w}", (E * F, H))
                    assemble = partial(_split_experts, experts=E, transpose=w == "w2")
                    targets.append(
                        Target(f"{dst}.switch_mlp.{proj}", "experts", (E, *shape), [ref], assemble)
                    )
                else:
                    refs = [get(f"{moe}.experts.{e}.{w}.weight", shape) for e in range(E)]
                    targets.append(
                        Target(f"{dst}.switch_mlp.{proj}", "experts", (E, *shape), refs, _stack)
                    )
        else:
            for w, proj, shape in (
                ("w1", "gate_proj", (F, H)),
                ("w3", "up_proj", (F, H)),
                ("w2", "down_proj", (H, F)),
            ):
                targets.append(
                    Target(
                        f"{out}.mlp.{proj}",
                        "mlp",
                        shape,
                        [get(f"{p}.feed_forward.{w}.weight", shape)],
                    )
                )
    targets.append(Target("model.norm", "norm", (H,), [get("norm.weight", (H,))]))
    targets.append(Target("lm_head", "head", (d.vocab, H), [get("output.weight", (d.vocab, H))]))
    get.check_unused()
    return targets
