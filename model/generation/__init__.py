"""Generation beside the single-stream Engine (model/generate.py), layered as mlx-lm's:
sampling.py (one sampler per request, from GenerationSettings; used by the Engine and the
batch), stops.py (`stop` strings over a reply's text), reply.py (a reply's tokens -> text and
finish reason), row.py + batch.py (several requests decoded together in one batch, for a
server), limit.py (batch_limit, DEFAULT_BATCH; MLX-free)."""
