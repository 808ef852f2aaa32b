"""`mixchat compare REFERENCE CANDIDATE`: what a checkpoint costs in quality against another.

Any two checkpoints of the same architecture and vocabulary (Hugging Face or Mistral float
weights, MLX-quantized directories, GGUF files) are streamed layer by layer over the built-in
multilingual text or the user's file (quantize/evaluate.py): perplexities, mean
KL(reference || candidate), top-1 agreement and, for MoE models, router agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.errors import MixchatError

DEFAULT_MAX_TOKENS = 2048


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError("must be at least 2")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `compare` subcommand (sets `func(args) -> exit code`)."""
    c = subparsers.add_parser(
        "compare",
        help="how far CANDIDATE's next-token predictions are from REFERENCE's, on a text",
        description="Stream two checkpoints of the same architecture and vocabulary layer by "
        "layer over a text (the built-in multilingual one, or BOS + FILE's text, whole, up to "
        "--max-tokens) and report both perplexities, the mean KL(REFERENCE || CANDIDATE) in "
        "nats per token, top-1 agreement and, for MoE models, router agreement. Memory: about "
        "one expert of one layer, whatever the models' size.",
    )
    c.add_argument("reference", help="model directory, .gguf file or cached repo id")
    c.add_argument("candidate", nargs="?",
                   help="model directory, .gguf file or cached repo id (not with --adapter-path)")
    c.add_argument(
        "--adapter-path", metavar="PATH",
        help="compare REFERENCE with the same model plus this LoRA adapter: how far the tune "
        "moved it (both loaded whole)",
    )  # fmt: skip
    c.add_argument("--text", metavar="FILE", help="UTF-8 text to evaluate on")
    c.add_argument(
        "--max-tokens", type=_positive, default=DEFAULT_MAX_TOKENS, metavar="N",
        help=f"evaluate at most N tokens, BOS included (default {DEFAULT_MAX_TOKENS})",
    )  # fmt: skip
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), help="compute dtype override"
    )
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages")
    c.set_defaults(func=run_compare)


def read_text(path: str) -> str:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MixchatError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise MixchatError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise MixchatError(f"cannot read {path}: {e.strerror}") from None
    if not text.strip():
        raise MixchatError(f"{path} is empty")
    return text


def compare_models(
    reference: str, candidate: str, text: str, max_tokens: int = DEFAULT_MAX_TOKENS,
    dtype: str | None = None, quiet: bool = True,
):  # fmt: skip
    """Open both checkpoints, check they are comparable, tokenize, stream: a Comparison."""
    from .evaluate import check_compatible, evaluate
    from .lazy_weights import open_weights
    from .progress import step_progress
    from .report import text_ids

    ref, ref_tokenizer = open_weights(reference, dtype)
    cand, cand_tokenizer = open_weights(candidate, dtype)
    check_compatible(ref, cand)
    ids = text_ids(ref_tokenizer, text, max_tokens)
    if text_ids(cand_tokenizer, text, max_tokens) != ids:
        raise MixchatError(
            f"different vocabularies: {reference} and {candidate} tokenize the text differently"
        )
    with step_progress("Comparing", quiet) as advance:
        return evaluate(ref, cand, ids, advance)


def run_compare(args: argparse.Namespace) -> int:
    from .report import eval_text, format_comparison

    if (args.candidate is None) == (args.adapter_path is None):
        raise MixchatError("give two models, or one model and --adapter-path (see `mixchat "
                           "compare --help`)")  # fmt: skip
    text = read_text(args.text) if args.text else eval_text()
    candidate = args.candidate or f"{args.reference} + {args.adapter_path}"
    try:
        if args.adapter_path:
            from .adapted import compare_adapter

            result = compare_adapter(args.reference, args.adapter_path, text, args.max_tokens,
                                     args.dtype)  # fmt: skip
        else:
            result = compare_models(
                args.reference, args.candidate, text, args.max_tokens, args.dtype,
                quiet=args.quiet,
            )  # fmt: skip
    except KeyboardInterrupt:
        print("mixchat: compare interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    where = f"on {args.text}" if args.text else "on the built-in multilingual text"
    print(
        format_comparison(
            f"{candidate} against {args.reference} {where} ({result.tokens} tokens):",
            ("reference", "candidate"),
            result.perplexity_reference,
            result.perplexity_candidate,
            result.kl_divergence,
            result.top1_agreement,
            result.router_agreement,
        )
    )
    return 0
