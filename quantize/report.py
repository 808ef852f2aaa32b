"""Quality report: how far the quantized model drifts from its source on a built-in text.

On `evaltext.txt` (English, French, German, Spanish, Italian and some Python, ~500 tokens) both
models predict every next token; the report gives each one's perplexity, the mean
KL(source || quantized) of the next-token distributions, how often their most likely next token
is the same, and, for MoE models, the share of token x layer positions whose chosen expert set is
unchanged. Both models are streamed layer by layer (quantize/evaluate.py), so the report runs at
any size: memory is about one expert of one layer, never the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .sources import Source

EVAL_TEXT = Path(__file__).with_name("evaltext.txt")


def eval_text() -> str:
    return EVAL_TEXT.read_text(encoding="utf-8")


def text_ids(tokenizer: Any, text: str, max_tokens: int | None = None) -> list[int]:
    """BOS (where the tokenizer has one) + the text's tokens, at most `max_tokens` in all."""
    ids = tokenizer.encode(text)
    if tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id, *ids]
    return ids[:max_tokens] if max_tokens else ids


def quality_report(
    source: Source, dst: Path, settings: dict[str, Any] | None = None, quiet: bool = True
) -> dict[str, Any]:
    """Stream the source and its quantized copy in `dst` over the built-in text and compare."""
    from model.tokenizer import load_tokenizer
    from model.weights import locate

    from .evaluate import evaluate
    from .lazy_weights import CheckpointWeights, SourceWeights
    from .progress import step_progress

    reference = SourceWeights(source)
    candidate = CheckpointWeights(locate(Path(dst)))
    ids = text_ids(load_tokenizer(Path(dst)), eval_text())
    with step_progress("Quality report", quiet) as advance:
        result = evaluate(reference, candidate, ids, advance)
    report: dict[str, Any] = {
        "tokens": result.tokens,
        "perplexity_source": result.perplexity_reference,
        "perplexity_quantized": result.perplexity_candidate,
        "kl_divergence": result.kl_divergence,
        "top1_agreement": result.top1_agreement,
        "router_agreement": result.router_agreement,
        "source": str(source.path),
        "quantized": str(dst),
    }
    if settings is not None:
        report["settings"] = settings
    return report


def save_report(report: dict[str, Any], dst: Path) -> Path:
    path = Path(dst) / "quantization_report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def format_report(report: dict[str, Any]) -> str:
    return format_comparison(
        f"Quality on the built-in multilingual text ({report['tokens']} tokens):",
        ("source", "quantized"),
        report["perplexity_source"],
        report["perplexity_quantized"],
        report["kl_divergence"],
        report["top1_agreement"],
        report.get("router_agreement"),
    )


def format_comparison(
    title: str,
    names: tuple[str, str],
    ppl_ref: float,
    ppl_cand: float,
    kl: float,
    top1: float,
    router: float | None,
) -> str:
    """The few lines `mixchat quantize` and `mixchat compare` print."""
    ref, cand = names
    lines = [
        title,
        f"  perplexity     {ref} {ppl_ref:.3f}   {cand} {ppl_cand:.3f}"
        f"   ({(ppl_cand / ppl_ref - 1) * 100:+.2f}%)",
        f"  KL divergence  {kl:.5f} nats/token ({ref} || {cand})",
        f"  top-1          {top1 * 100:.2f}% of next-token predictions agree",
    ]
    if router is not None:
        lines.append(
            f"  router         {router * 100:.2f}% of token x layer expert choices unchanged"
        )
    return "\n".join(lines)
