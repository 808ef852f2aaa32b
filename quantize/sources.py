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

from model.config import FAMILY_TYPES, QUANTIZE_TYPES, SUPPORTED_TYPES, ModelArgs, parameter_shapes
from model.errors import CheckpointError, MixchatError, UnsupportedModelError
from model.names import (
    EXPERT_MARK,
    FAMILY_EXPERTS,
    HF_TOKENIZER_FILES,
    VOCABULARY_FILES,
    family_source_name,
    source_name,
)
from model.safetensors_header import (
    PICKLE_SUFFIXES,
    SAFETENSORS_FLOATS,
    dominant_dtype,
    read_safetensors_header,
    safetensors_shards,
)

from .sanitized import ITEM_BYTES, packed_quantization, sanitized_parameters

# Tokenizer and generation files copied next to the quantized weights.
HF_EXTRA_FILES = (*HF_TOKENIZER_FILES, "generation_config.json")
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class TensorRef:
    """One tensor inside one safetensors file."""

    file: Path
    name: str
    dtype: str  # safetensors dtype: "BF16", "F16", "F32" (an MXFP4 source's blocks: "U8")
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        size = ITEM_BYTES[self.dtype]
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
    kind: str  # "embed" | "attn" | "router" | "experts" | "mlp" | "norm" | "head" | "param"
    shape: tuple[int, ...]  # shape of the assembled full-precision weight
    refs: list[TensorRef]
    assemble: Callable[[list], Any] = _single
    # A family's module as mlx-lm quantizes it (its model's quant_predicate): False never,
    # True at the requested bits, a dict its own {"bits", "group_size"}; None: mixchat's recipe.
    choice: bool | dict | None = None
    lazy: Callable[[], Any] | None = None  # the weight built otherwise (a family's sanitize)
    dtype: str | None = None  # a "param" already quantized (MXFP4 weight, scales): kept as is

    @property
    def tensor(self) -> str:
        """The output tensor's name: a module's weight, or a "param" target's own name (a bias)."""
        return self.module if self.kind == "param" else f"{self.module}.weight"

    @property
    def source_bytes(self) -> int:
        return sum(r.nbytes for r in self.refs)

    def load(self) -> Any:
        """The assembled weight as a lazy mx.array (nothing is read until it is evaluated)."""
        import mlx.core as mx

        if self.lazy is not None:
            return self.lazy()
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
    args: ModelArgs
    extra_files: dict[str, Path] = field(default_factory=dict)  # name in DST -> source file
    quantization: dict | None = None  # an MXFP4 source's own (kept), mlx-lm's default mode

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def total_bytes(self) -> int:
        return sum(t.source_bytes for t in self.targets)

    @property
    def num_params(self) -> int:
        n = 0
        for t in self.targets:  # an MXFP4 weight kept packed: 32 / bits weights a uint32
            size = 32 // self.quantization["bits"] if t.dtype == "uint32" else 0 if t.dtype else 1
            for d in t.shape:
                size *= d
            n += size
        return n


# ----------------------------------------------------------------------------- locating


def resolve_source(src: str) -> Path:
    """A local directory, or a repo id already in the local Hugging Face cache (model.registry)."""
    from model.registry import resolve

    try:
        path = resolve(src)
    except MixchatError as e:
        raise CheckpointError(str(e)) from None
    if not path.is_dir():
        raise CheckpointError(f"{src} is a file; SRC must be a model directory or a repo id")
    return path


# ----------------------------------------------------------------------------- safetensors


def read_header(path: Path, packed: bool = False) -> dict[str, TensorRef]:
    """Parse a safetensors header (model.weights checks it is well-formed and not truncated);
    every tensor must be a float one (`packed`: or MXFP4 bytes) with consistent byte offsets."""
    tensors: dict[str, TensorRef] = {}
    for name, spec in read_safetensors_header(path).items():
        if spec.dtype not in SAFETENSORS_FLOATS and not (packed and spec.dtype == "U8"):
            raise UnsupportedModelError(
                f"{path.name}: tensor {name} has dtype {spec.dtype}; mixchat quantizes float16, "
                "bfloat16 or float32 checkpoints (is this one already quantized?)"
            )
        ref = TensorRef(path, name, spec.dtype, spec.shape)
        if spec.nbytes != ref.nbytes:
            raise CheckpointError(f"{path.name}: tensor {name} has inconsistent byte offsets")
        tensors[name] = ref
    return tensors


def _index_tensors(shards: list[Path], packed: bool = False) -> dict[str, TensorRef]:
    tensors: dict[str, TensorRef] = {}
    for shard in shards:
        for name, ref in read_header(shard, packed).items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name} appears in both {tensors[name].file.name} and {shard.name}"
                )
            tensors[name] = ref
    return tensors


def _dominant_dtype(tensors: dict[str, TensorRef]) -> str:
    return SAFETENSORS_FLOATS[dominant_dtype(tensors.values()) or "F32"][0]


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


def _args(make: Callable[[], ModelArgs], file: str) -> ModelArgs:
    """ModelArgs from a config file; its one-line errors name the file."""
    try:
        args = make()
    except MixchatError as e:
        raise type(e)(str(e).replace("config.json", file)) from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{file} has a malformed field: {e}") from None
    if args.head_dim % 2:
        raise CheckpointError(f"{file}: head dimension {args.head_dim} is odd")
    return args


def _open_hf(path: Path) -> Source:
    config = _load_json(path / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES + FAMILY_TYPES:
        arch = (config.get("architectures") or [model_type or "unknown"])[0]
        raise UnsupportedModelError(
            f"unsupported architecture '{model_type or arch}' (mixchat quantizes "
            f"{', '.join(SUPPORTED_TYPES + FAMILY_TYPES)} checkpoints)"
        )
    if model_type not in QUANTIZE_TYPES:
        raise UnsupportedModelError(
            f"mixchat quantize does not convert {model_type} checkpoints: convert it with "
            f"`mlx_lm.convert --hf-path {path} --mlx-path DIR -q`"
        )
    try:
        packed = packed_quantization(config)  # gpt-oss's MXFP4 experts: kept as mlx-lm does
    except ValueError:
        raise UnsupportedModelError(f"{path} is already quantized; quantize the original weights") from None  # fmt: skip
    args = _args(lambda: ModelArgs.from_hf_config(config), "config.json")
    if not any(path.glob("*.safetensors")):
        _refuse_pickles(path)
        raise CheckpointError(f"no safetensors weights in {path}")
    shards = safetensors_shards(path)
    if not shards:
        raise CheckpointError(f"no model*.safetensors weights in {path}")
    tensors = _index_tensors(shards, packed is not None)
    get = _Lookup(tensors, "config.json")
    targets = _family_targets(args, get) if args.is_family else _targets(args, "hf", get)
    get.check_unused(lambda n: args.tie_word_embeddings and n == "lm_head.weight")
    out = dict(config)
    rope = out.get("rope_parameters") or {}
    if "rope_theta" not in out and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]  # mlx-lm reads the top-level key
    extra = {n: path / n for n in HF_EXTRA_FILES if (path / n).is_file()}
    _require_tokenizer(path, extra)
    return Source(path, "hf", out, _dominant_dtype(tensors), shards, targets, args, extra, packed)


def _require_tokenizer(path: Path, extra: dict[str, Path]) -> None:
    if not any(n in extra for n in VOCABULARY_FILES):
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


def _kind(module: str) -> str:
    """What a module is, for the quantization recipe (quantize.convert.Settings.precision_for)."""
    if module == "model.embed_tokens":
        return "embed"
    if module == "lm_head":
        return "head"
    if module.endswith("norm"):
        return "norm"
    if ".self_attn." in module:
        return "attn"
    if module.endswith((".block_sparse_moe.gate", ".mlp.gate", ".shared_expert_gate")):
        return "router"
    return "experts" if EXPERT_MARK in module or ".switch_mlp." in module else "mlp"


def _family_targets(args: ModelArgs, get: _Lookup) -> list[Target]:
    """One Target per parameter of mlx-lm's definition of a family (model.families), found
    under its published name (model.names.FAMILY_EXPERTS: experts one tensor each, stacked),
    with the precision mlx-lm's own quantization gives each module (its `quant_predicate`,
    e.g. Qwen3-MoE's 8-bit router; modules without `to_quantized` never)."""
    from model.families import mlx_lm_model

    model = mlx_lm_model(args)
    predicate = getattr(model, "quant_predicate", None)
    choices = {
        path: (predicate(path, module) if predicate else True)
        for path, module in model.named_modules()
        if hasattr(module, "to_quantized")
    }
    if args.model_type not in FAMILY_EXPERTS:
        return _sanitized_targets(args, model, choices, get)
    targets = []
    for name, shape in parameter_shapes(args).items():
        module, dot, part = name.rpartition(".")
        source, stacked = family_source_name(args.model_type, name)
        if part != "weight":  # a bias: kept as it is
            targets.append(Target(name, "param", shape, [get(source, shape)]))
        elif stacked:
            refs = [get(source.replace("{e}", str(e)), shape[1:]) for e in range(shape[0])]
            targets.append(Target(module, "experts", shape, refs, _stack, choices.get(module)))
        else:
            choice = choices.get(module, False)
            targets.append(Target(module, _kind(module), shape, [get(source, shape)], choice=choice))
    return targets


def _sanitized_targets(args: ModelArgs, model: Any, choices: dict, get: _Lookup) -> list[Target]:
    """Each parameter as mlx-lm's `sanitize` makes it, as mlx_lm.convert does (quantize.sanitized)."""
    from model.families import BEFORE_SANITIZE

    targets = []
    before = BEFORE_SANITIZE.get(args.model_type)
    for name, shape, refs, lazy, kept in sanitized_parameters(model, get, parameter_shapes(args), before):  # fmt: skip
        module, _, part = name.rpartition(".")
        if kept:  # already quantized (MXFP4 experts): written as it is
            targets.append(Target(name, "param", shape, refs, lazy=lazy, dtype=kept))
            continue
        kind = "param" if part != "weight" else _kind(module).replace("mlp", "mlp" if len(shape) < 3 else "experts")  # fmt: skip
        choice = choices.get(module, kind == "experts") if kind != "param" else None
        targets.append(Target(name if kind == "param" else module, kind, shape, refs, choice=choice, lazy=lazy))  # fmt: skip
    return targets


def _source_name(layout: str, module: str) -> str:
    if (name := source_name(layout, module)) is None:
        raise CheckpointError(f"internal error: no source name for {module}")
    return name


def _targets(args: ModelArgs, layout: str, get: _Lookup, moe: str = "", stacked: bool = False,
             permute: bool = False) -> list[Target]:  # fmt: skip
    """One Target per weight of the model definition (model.config.parameter_shapes), its
    source tensors found under `layout`'s names (model.names: "hf" or "mistral"). `permute`:
    Mistral's interleaved RoPE layout of Q/K; `stacked`: the first Mixtral release's experts
    concatenated along rows."""
    heads = {"q_proj": args.num_attention_heads, "k_proj": args.num_key_value_heads}
    targets = []
    for weight, shape in parameter_shapes(args).items():
        module = weight.removesuffix(".weight")
        kind = _kind(module)
        name = _source_name(layout, module).replace("{moe}", moe)
        if kind == "experts" and stacked:
            E, rows, cols = shape
            w = name.rsplit(".experts.", 1)[0] + "." + name.rsplit(".", 1)[1]  # ...moe.w1
            transpose = w.endswith(".w2")
            ref = get(w, (E * cols, rows) if transpose else (E * rows, cols))
            split = partial(_split_experts, experts=E, transpose=transpose)
            targets.append(Target(module, kind, shape, [ref], split))
        elif kind == "experts":
            refs = [
                get(name.replace("{e}", str(e)) + ".weight", shape[1:]) for e in range(shape[0])
            ]
            targets.append(Target(module, kind, shape, refs, _stack))
        else:
            proj = module.rsplit(".", 1)[-1]
            assemble = (
                partial(_permute_rope, heads=heads[proj]) if permute and proj in heads else _single
            )
            targets.append(Target(module, kind, shape, [get(name + ".weight", shape)], assemble))
    return targets


# ----------------------------------------------------------------------------- Mistral format


def _open_mistral(path: Path) -> Source:
    params = _load_json(path / "params.json")
    if not any(path.glob("*.safetensors")):
        _refuse_pickles(path)
        raise CheckpointError(f"no safetensors weights in {path}")
    shards = safetensors_shards(path, "consolidated")
    if not shards:
        raise CheckpointError(f"no consolidated*.safetensors weights in {path}")
    tensors = _index_tensors(shards)
    vocab = params.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:  # some early params.json files say -1
        if "tok_embeddings.weight" not in tensors:
            raise CheckpointError("checkpoint lacks tensor tok_embeddings.weight")
        params = {**params, "vocab_size": tensors["tok_embeddings.weight"].shape[0]}
    args = _args(lambda: ModelArgs.from_mistral_params(params), "params.json")
    # Which of Mistral's MoE layouts: per-expert modules under feed_forward or block_sparse_moe,
    # or the first release's experts stacked along rows in block_sparse_moe.w1/w2/w3.
    moe, stacked = "feed_forward", False
    if "layers.0.block_sparse_moe.w1" in tensors:
        moe, stacked = "block_sparse_moe", True
    elif "layers.0.block_sparse_moe.experts.0.w1.weight" in tensors:
        moe = "block_sparse_moe"
    get = _Lookup(tensors, "params.json")
    targets = _targets(args, "mistral", get, moe=moe, stacked=stacked, permute=True)
    get.check_unused()
    dtype = _dominant_dtype(tensors)
    config: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if args.is_moe else "MistralForCausalLM"],
        "model_type": args.model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": int(params.get("max_seq_len") or params.get("max_position_embeddings") or 32768),  # fmt: skip
        "sliding_window": args.sliding_window,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }
    if args.is_moe:
        config.update(num_local_experts=args.num_local_experts, num_experts_per_tok=args.num_experts_per_tok)  # fmt: skip
    extra: dict[str, Path] = {}
    sp = sorted(path.glob("tokenizer.model*"))  # tokenizer.model, tokenizer.model.v3, ...
    if sp:
        extra["tokenizer.model"] = sp[0]
    if (path / "tekken.json").is_file():
        extra["tekken.json"] = path / "tekken.json"
    _require_tokenizer(path, extra)
    return Source(path, "mistral", config, dtype, shards, targets, args, extra)
