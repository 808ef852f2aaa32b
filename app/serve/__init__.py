"""`mixchat serve`: an OpenAI-compatible local server that keeps a model loaded.

server.py (Starlette app and routes) · requests.py (request bodies -> GenerationRequest, OpenAI
errors) · models.py (load on request, keep-alive, KV caches per conversation prefix) ·
scheduler.py (one generation at a time, fair bounded FIFO queue, cancellation) · stops.py
(`stop` strings); the command itself: app/cli/serve.py.
"""
