"""Adapted models against others: `compare MODEL --adapter-path A` (the base model against the
same model with the adapter: how far the tune moved it) and `fuse`'s quality report (the fused
checkpoint against the unfused adapted model). Both models are loaded whole (an adapter needs
its model in memory), and the figures are quantize/evaluate.py's: perplexities, mean KL, top-1
agreement, over the same tokens."""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import numpy as np

from model.load_options import LoadOptions
from model.loader import load_checkpoint

from .evaluate import Comparison, token_statistics, vocabulary_slices
from .report import text_ids


def hidden(model, ids: list[int]) -> mx.array:
    """The final-normed hidden states [n, hidden] of `ids` (the last token predicts nothing)."""
    h = model.hidden_states(mx.array(ids[:-1])[None])[0]
    mx.eval(h)
    return h


def compare_hidden(ref_model, h_ref: mx.array, cand_model, h_cand: mx.array,
                   ids: list[int]) -> Comparison:  # fmt: skip
    """The figures of two models' next-token predictions over `ids` (vocabulary in slices)."""
    args = ref_model.args

    def blocks() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for a, b in vocabulary_slices(args.vocab_size, args.hidden_size, len(ids) - 1):
            lp = ref_model.logits(h_ref)[:, a:b].astype(mx.float32)
            lq = cand_model.logits(h_cand)[:, a:b].astype(mx.float32)
            yield a, np.array(lp, dtype=np.float64), np.array(lq, dtype=np.float64)

    ppl_p, ppl_q, kl, top1 = token_statistics(blocks(), np.array(ids[1:]))
    return Comparison(tokens=len(ids), perplexity_reference=ppl_p, perplexity_candidate=ppl_q,
                      kl_divergence=kl, top1_agreement=top1, router_agreement=None)  # fmt: skip


def compare_adapter(model: str, adapter: str, text: str, max_tokens: int,
                    dtype: str | None = None) -> Comparison:  # fmt: skip
    """`model` (reference) against `model` with the adapter in `adapter` (candidate)."""
    from model.tune.lora import set_adapter

    loaded = load_checkpoint(model, LoadOptions(dtype=dtype, memory_budget="none"))
    ids = text_ids(loaded.tokenizer, text, max_tokens)
    base = hidden(loaded.model, ids)
    set_adapter(loaded.model, adapter)
    adapted = hidden(loaded.model, ids)
    # The head is not adapted (LoRA wraps the layers' projections): one model serves both.
    return compare_hidden(loaded.model, base, loaded.model, adapted, ids)
