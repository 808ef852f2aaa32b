"""`mixchat fuse --model M --adapter-path A OUT [--dequantize]`: a checkpoint with a LoRA adapter
merged into its weights (mlx-lm's `fuse` of its LoRA layers), quantized layers re-quantized with
their own bits and group size (float with --dequantize), in mlx-lm's directory layout: mixchat
and `mlx_lm.utils.load` both load it. Then the quality report: the fused checkpoint against the
unfused adapted model (quantize/adapted.py), the rounding a re-quantization costs."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from model.errors import MixchatError

WEIGHT_FILES = ("model.safetensors.index.json",)  # written anew, never copied


def register(subparsers: argparse._SubParsersAction) -> None:
    f = subparsers.add_parser(
        "fuse", help="write a checkpoint with a LoRA adapter merged into its weights",
        description="Merge a LoRA adapter (mixchat tune's or mlx_lm.lora's) into a model and "
        "write the result to OUT (mlx-lm's layout: mixchat and mlx-lm load it), then report "
        "how far it is from the unfused adapted model.",
    )  # fmt: skip
    f.add_argument("--model", "-m", required=True, help="model directory or cached repo id")
    f.add_argument("--adapter-path", required=True, metavar="PATH", help="the adapter directory")
    f.add_argument("out", metavar="OUT", help="the directory to write")
    f.add_argument("--dequantize", action="store_true",
                   help="write float weights (default: quantized layers keep their bits)")  # fmt: skip
    f.add_argument("--quiet", action="store_true", help="no quality report")
    f.set_defaults(func=run_fuse)


def fuse(model: str, adapter: str, out: str | Path, dequantize: bool = False) -> Path:
    """Write `model` + `adapter`, fused, into `out` (atomically: a sibling, then a rename)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    from model.load_options import LoadOptions
    from model.loader import load_checkpoint
    from model.tune.lora import fuse_adapter

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MixchatError(f"{out} exists and is not an empty directory")
    loaded = load_checkpoint(model, LoadOptions(memory_budget="none", adapter_path=adapter))
    source = loaded.checkpoint.path
    if loaded.checkpoint.format == "gguf" or not (source / "config.json").is_file():
        raise MixchatError(
            f"fuse writes mlx-lm's layout and needs a Hugging Face or MLX directory, not "
            f"{source.name}: convert it first (`mixchat quantize {source.name} DIR`, then "
            "`mixchat fuse --model DIR …`), or use the adapter as it is (`--adapter-path`)"
        )
    fuse_adapter(loaded.model, dequantize)
    config = json.loads((source / "config.json").read_text())
    if dequantize:
        dequantize_model(loaded.model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    weights = dict(tree_flatten(loaded.model.parameters()))
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for path in source.iterdir():  # tokenizer, generation config, chat template...
        if path.is_file() and path.suffix != ".safetensors" and path.name not in WEIGHT_FILES:
            shutil.copyfile(path, partial / path.name)
    mx.save_safetensors(str(partial / "model.safetensors"), weights, metadata={"format": "mlx"})
    (partial / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return out


def fuse_report(model: str, adapter: str, fused: str | Path, max_tokens: int = 512):
    """The fused checkpoint (candidate) against the unfused adapted model (reference), on the
    built-in text: a quantize.evaluate.Comparison."""
    from model.load_options import LoadOptions
    from model.loader import load_checkpoint

    from .adapted import compare_hidden, hidden
    from .report import eval_text, text_ids

    ref = load_checkpoint(model, LoadOptions(memory_budget="none", adapter_path=adapter))
    cand = load_checkpoint(str(fused), LoadOptions(memory_budget="none"))
    ids = text_ids(ref.tokenizer, eval_text(), max_tokens)
    return compare_hidden(ref.model, hidden(ref.model, ids), cand.model, hidden(cand.model, ids),
                          ids)  # fmt: skip


def run_fuse(args: argparse.Namespace) -> int:
    from .report import format_comparison

    out = fuse(args.model, args.adapter_path, args.out, args.dequantize)
    print(f"fused model written to {out}", file=sys.stderr)
    if not args.quiet:
        r = fuse_report(args.model, args.adapter_path, out)
        print(format_comparison(
            f"{out} against the unfused adapted model on the built-in text ({r.tokens} tokens):",
            ("adapted", "fused"), r.perplexity_reference, r.perplexity_candidate,
            r.kl_divergence, r.top1_agreement, None,
        ))  # fmt: skip
    return 0
