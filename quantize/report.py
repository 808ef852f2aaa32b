"""Quality report: how far the quantized model drifts from its source on a built-in text.

On `evaltext.txt` (English, French, German, Spanish, Italian and some Python, ~500 tokens) both
models predict every next token; the report gives each one's perplexity, the mean
KL(source || quantized) of the next-token distributions, and, for MoE models, the share of
token x layer positions whose chosen expert set is unchanged. One model is in memory at a time.
"""

from __future__ import annotations

import gc
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .sources import Source

EVAL_TEXT = Path(__file__).with_name("evaltext.txt")


def eval_text() -> str:
    return EVAL_TEXT.read_text(encoding="utf-8")


@dataclass
class Outputs:
    """One model's log-probabilities [T, V] (float32) and expert choices [layers, T, k] or None."""

    logprobs: np.ndarray
    routing: np.ndarray | None


def run_model(model: Any, ids: list[int]) -> Outputs:
    """Forward `ids` through a mixchat model, recording the router's choices (see CONTRACTS)."""
    import mlx.core as mx

    model.routing = []
    try:
        logits = model(mx.array([ids]))[0].astype(mx.float32)  # [T, V]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        routes = [r[0] for r in model.routing]  # each [T, k]
        mx.eval(logprobs, *routes)
    finally:
        model.routing = None
    routing = np.stack([np.array(r) for r in routes]) if routes else None
    return Outputs(np.array(logprobs), routing)


def compare(ids: list[int], source: Outputs, quantized: Outputs) -> dict[str, Any]:
    """Perplexities, mean KL(source || quantized) and router agreement, from the raw outputs.

    Perplexity and KL use positions 0..T-2 (each predicts the next token of `ids`); router
    agreement counts every token at every MoE layer.
    """
    target = np.asarray(ids[1:])
    lp, lq = source.logprobs[:-1].astype(np.float64), quantized.logprobs[:-1].astype(np.float64)
    rows = np.arange(len(target))
    ppl_src = math.exp(-lp[rows, target].mean())
    ppl_q = math.exp(-lq[rows, target].mean())
    kl = float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())
    agreement = None
    if source.routing is not None and quantized.routing is not None:
        same = np.all(
            np.sort(source.routing, axis=-1) == np.sort(quantized.routing, axis=-1), axis=-1
        )
        agreement = float(same.mean())
    return {
        "tokens": len(ids),
        "perplexity_source": ppl_src,
        "perplexity_quantized": ppl_q,
        "kl_divergence": kl,
        "router_agreement": agreement,
    }


def _release() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def source_fits(source: Source) -> tuple[bool, str]:
    """Whether the unquantized source can be held in memory for the comparison."""
    import mlx.core as mx

    need = source.total_bytes
    if mx.default_device().type == mx.DeviceType.cpu and source.dtype != "float32":
        need *= 2  # computed in float32 on the CPU
    total = _memory_bytes()
    if total and need > 0.7 * total:
        from model.sizes import format_bytes

        return (
            False,
            f"the unquantized model needs {format_bytes(need)} of memory, this machine has {format_bytes(total)}",
        )
    return True, ""


def load_source_model(source: Source) -> Any:
    """The source model through mixchat's loader; Mistral-format sources are assembled here."""
    if source.format == "hf":
        from model import load

        model, _ = load(source.path)
        return model
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from model import Model
    from model.config import ModelArgs

    args = ModelArgs.from_hf_config(source.config)
    model = Model(args)
    dtype = (
        mx.float32 if mx.default_device().type == mx.DeviceType.cpu else getattr(mx, source.dtype)
    )
    weights = [(f"{t.module}.weight", t.load().astype(dtype)) for t in source.targets]
    model.update(tree_unflatten(weights))
    return model


def load_quantized(path: Path) -> tuple[Any, Any]:
    """mixchat's loader; on the CPU the weights are then dequantized to float32 up front, which
    gives the same numbers as the fused quantized kernels, many times faster there."""
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    from model import load

    model, tokenizer = load(path)
    if mx.default_device().type == mx.DeviceType.cpu:
        dequantize_model(model)
    return model, tokenizer


def quality_report(
    source: Source, dst: Path, settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run both models on the built-in text and compare them (quantized first, then source)."""
    model, tokenizer = load_quantized(dst)
    ids = tokenizer.encode(eval_text())
    if tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id, *ids]
    quantized = run_model(model, ids)
    del model
    _release()
    model = load_source_model(source)
    src = run_model(model, ids)
    del model
    _release()
    report = compare(ids, src, quantized)
    report["source"] = str(source.path)
    report["quantized"] = str(dst)
    if settings is not None:
        report["settings"] = settings
    return report


def save_report(report: dict[str, Any], dst: Path) -> Path:
    path = Path(dst) / "quantization_report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"Quality on the built-in multilingual text ({report['tokens']} tokens):",
        f"  perplexity     source {report['perplexity_source']:.3f}   quantized {report['perplexity_quantized']:.3f}"
        f"   ({(report['perplexity_quantized'] / report['perplexity_source'] - 1) * 100:+.2f}%)",
        f"  KL divergence  {report['kl_divergence']:.5f} nats/token (source || quantized)",
    ]
    if report.get("router_agreement") is not None:
        lines.append(
            f"  router         {report['router_agreement'] * 100:.2f}% of token x layer expert choices unchanged"
        )
    return "\n".join(lines)
