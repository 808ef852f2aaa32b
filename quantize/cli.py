"""`mixchat download`, `quantize` and `compare`: `register(subparsers)` adds them to mixchat's CLI."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from model.errors import MixchatError
from model.sizes import format_bytes, parse_size

BITS = (2, 3, 4, 6, 8)


def _size(text: str) -> int:
    """argparse type of a SIZE: model/sizes.py's parse_size, its error as a usage error."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `download` and `quantize` subcommands (each sets `func(args) -> exit code`)."""
    d = subparsers.add_parser(
        "download",
        help="download a model from the Hugging Face Hub (only what inference needs)",
        description="Download config, safetensors weights and tokenizer files of REPO_ID into the "
        "Hugging Face cache (no .bin/.pth). Resumes interrupted downloads; with HF_HUB_OFFLINE=1 "
        "it only resolves the repo from the local cache.",
    )
    d.add_argument("repo_id", help="e.g. mistralai/Mixtral-8x7B-Instruct-v0.1")
    d.add_argument("--revision", help="branch, tag or commit (default: main)")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages")
    d.set_defaults(func=run_download)

    q = subparsers.add_parser(
        "quantize",
        help="quantize a checkpoint to MLX's group-wise format (loads in mixchat and mlx-lm)",
        description="Quantize SRC (a Hugging Face directory, a repo id in the local HF cache, or "
        "Mistral's params.json + consolidated*.safetensors) into DST, streaming one tensor at a "
        "time. Work goes to DST.partial; re-running the same command resumes it. A .gguf SRC is "
        "converted into an MLX directory as mixchat loads it (its own quantization and "
        "tokenizer kept, the same replies; --bits and the other quantization options do not "
        "apply).",
    )
    q.add_argument("src", help="model directory, cached repo id or .gguf file")
    q.add_argument("dst", help="output directory")
    q.add_argument("--bits", type=int, choices=BITS, default=4, help="bits per weight (default 4)")
    q.add_argument(
        "--group-size",
        type=int,
        choices=(32, 64, 128),
        default=64,
        help="weights per scale/bias (default 64)",
    )
    q.add_argument(
        "--router-bits", type=int, choices=(*BITS, 16), default=16,
        help="MoE router: 16 keeps it unquantized (default), 8 = 8-bit",
    )  # fmt: skip
    q.add_argument(
        "--expert-bits", type=int, choices=BITS, help="bits for the MoE experts (default: --bits)"
    )
    q.add_argument(
        "--embed-bits", type=int, choices=(*BITS, 16),
        help="bits for the token embedding and output projection, 16 = unquantized (default: --bits)",
    )  # fmt: skip
    q.add_argument(
        "--dtype", choices=("float16", "bfloat16", "float32"),
        help="dtype of scales, biases and unquantized tensors (default: the source's)",
    )  # fmt: skip
    q.add_argument(
        "--max-shard-size", type=_size, default="5GB", metavar="SIZE",
        help="largest output shard (default 5GB)",
    )
    q.add_argument("--force", action="store_true", help="replace DST if it exists")
    q.add_argument("--no-eval", action="store_true", help="skip the quality report")
    q.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages")
    q.set_defaults(func=run_quantize)

    from .compare import register as register_compare

    register_compare(subparsers)


def run_download(args: argparse.Namespace) -> int:
    from .download import download

    try:
        mixchat = getattr(args, "settings", None)  # app/settings.py's values, when mixchat runs it
        offline = mixchat is not None and mixchat.hf_offline
        path = download(args.repo_id, args.revision, quiet=args.quiet, offline=offline)
    except KeyboardInterrupt:
        print(
            "mixchat: download interrupted; run the same command again to resume", file=sys.stderr
        )
        return 130
    print(path)
    return 0


def run_gguf(args: argparse.Namespace) -> int:
    """`mixchat quantize MODEL.gguf DST`: the GGUF as an MLX directory (quantize/gguf_dir.py)."""
    from model.registry import remember

    from .gguf_dir import convert_gguf
    from .progress import fmt_duration

    progress = not args.quiet and sys.stderr.isatty()

    def say(message: str) -> None:  # one line, rewritten
        if progress:
            print(f"\r\033[K{message}", end="", file=sys.stderr, flush=True)

    result = convert_gguf(Path(args.src).expanduser(), Path(args.dst), force=args.force,
                          max_shard_bytes=args.max_shard_size, say=say)  # fmt: skip
    if (mixchat := getattr(args, "settings", None)) is not None:  # app/settings.py's values
        remember(result.dst.resolve(), mixchat.data_dir)  # so `mixchat models` lists it
    if progress:
        print("\r\033[K", end="", file=sys.stderr)
    if not args.quiet:
        print(f"Wrote {result.dst} ({format_bytes(result.total_bytes)}, "
              f"{result.bits_per_weight:.2f} bits/weight, as mixchat loads {Path(args.src).name}) "
              f"in {fmt_duration(result.seconds)}")  # fmt: skip
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from .gguf_dir import is_gguf

    if is_gguf(args.src):
        return run_gguf(args)
    from .convert import Settings, convert
    from .progress import fmt_duration, stderr_console
    from .report import format_report, quality_report, save_report
    from .sources import open_source

    console = stderr_console()

    def say(msg: str) -> None:
        if not args.quiet:
            console.print(msg, markup=False)

    settings = Settings(
        bits=args.bits,
        group_size=args.group_size,
        router_bits=args.router_bits,
        embed_bits=args.embed_bits,
        expert_bits=args.expert_bits,
        dtype=args.dtype,
        max_shard_bytes=args.max_shard_size,
    )
    settings.validate()
    source = open_source(args.src)
    if source.quantization and args.expert_bits:  # never a flag silently ignored
        raise MixchatError(
            f"--expert-bits: the experts of {args.src} are "
            f"{source.quantization['mode'].upper()} as published and are kept so; dequantize "
            "the checkpoint first to choose their bits"
        )
    try:
        result = convert(source, args.dst, settings, force=args.force, quiet=args.quiet)
    except KeyboardInterrupt:
        print(
            f"mixchat: interrupted; run the same command again to resume from {args.dst}.partial",
            file=sys.stderr,
        )
        return 130
    from model.registry import remember

    if (mixchat := getattr(args, "settings", None)) is not None:  # app/settings.py's values
        remember(Path(result.dst), mixchat.data_dir)  # so `mixchat models` lists it
    if not args.quiet:
        print(
            f"Wrote {result.dst} ({format_bytes(result.total_bytes)}, {result.bits_per_weight:.2f} "
            f"bits/weight) in {fmt_duration(result.seconds)}"
        )
    if args.no_eval:
        return 0
    say("Comparing with the source on the built-in multilingual text, layer by layer…")
    try:
        report = quality_report(source, Path(args.dst), settings=asdict(settings), quiet=args.quiet)
    except KeyboardInterrupt:
        print(f"mixchat: quality report interrupted; {args.dst} is complete", file=sys.stderr)
        return 130
    except MixchatError as e:
        print(f"mixchat: warning: quality report failed: {e}", file=sys.stderr)
        return 0
    save_report(report, Path(args.dst))
    if not args.quiet:
        print(format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m quantize.cli quantize SRC DST`), same behavior as mixchat's."""
    parser = argparse.ArgumentParser(prog="mixchat")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MixchatError as e:
        print(f"mixchat: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
