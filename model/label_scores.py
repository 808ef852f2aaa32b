"""Classification by next-token probabilities: one forward pass of a loaded Engine's model
over a prompt, read at its last position (guard models and self-checks in app/moderation)."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .errors import MixchatError


class NextToken:
    """Log-probabilities [vocab] of the token after `ids` (`logprobs`), and after tokens then
    appended (`append`): one pass over `ids`, then one token a step, through a KV cache of its
    own (the engine's cache for its chat is left as it was)."""

    def __init__(self, engine, ids: Sequence[int]):
        if not ids:
            raise MixchatError("nothing to score: the prompt is empty")
        if len(ids) > engine.context_length:
            raise MixchatError(
                f"the text is too long for {engine.name}: {len(ids)} tokens, "
                f"{engine.context_length} fit"
            )
        self.model = engine.model
        if getattr(self.model, "stage", None) is not None:
            raise MixchatError("a guard runs on one machine, not on a model split over several")
        self.cache = self.model.make_cache()
        self.logprobs = self._step(ids)

    def _step(self, ids: Sequence[int]) -> np.ndarray:
        hidden = self.model.hidden_states(mx.array([list(ids)], dtype=mx.int32), self.cache)
        logits = self.model.logits(hidden[:, -1, :]).astype(mx.float32)
        return np.array((logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0])

    def append(self, token: int) -> np.ndarray:
        """The log-probabilities after `token` is appended (one decode step)."""
        self.logprobs = self._step([token])
        return self.logprobs


def next_token_logprobs(engine, ids: Sequence[int]) -> np.ndarray:
    """Log-probabilities [vocab] of the token after `ids`: one pass, no KV cache kept (the
    engine's cache for its chat is left as it was)."""
    return NextToken(engine, ids).logprobs


def label_first_ids(tokenizer, labels: dict[str, Sequence[str]]) -> dict[str, list[int]]:
    """Each label -> the first token ids of its spellings, keeping only ids no other label has
    (a label whose spellings all collide gets [])."""
    firsts = {
        label: {ids[0] for s in spellings if (ids := tokenizer.encode(s))}
        for label, spellings in labels.items()
    }
    out = {}
    for label, ids in firsts.items():
        others = set().union(*(v for k, v in firsts.items() if k != label))
        out[label] = sorted(ids - others)
    return out


def label_probabilities(logprobs: np.ndarray, label_ids: dict[str, list[int]]) -> dict[str, float]:
    """Each label's probability mass (summed over its first ids), not renormalized."""
    probs = np.exp(logprobs.astype(np.float64))
    return {label: float(probs[ids].sum()) if ids else 0.0 for label, ids in label_ids.items()}
