"""`mixchat serve`: an OpenAI-compatible local server that keeps a model loaded.

server.py (Starlette app and routes) · requests.py (request bodies -> GenerationRequest, OpenAI
errors) · models.py (load on request, keep-alive, KV caches per conversation prefix) ·
scheduler.py (fair bounded FIFO queue, cancellation; generation itself, alone or batched, is
model/generate.py's and model/generation/'s); the command itself: app/cli/serve.py.
"""
