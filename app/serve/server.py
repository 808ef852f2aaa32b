"""The Starlette app: OpenAI's /v1/chat/completions, /v1/completions, /v1/models,
/v1/moderations (and Mistral's /v1/chat/moderations), and /health.

Every error is OpenAI-style JSON (`{"error": {"message", "type", "code", "param"}}`) with a 4xx
status, or 500 for a bug; the server keeps serving either way. Streams are server-sent events
ending with `data: [DONE]`; a client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from model.errors import MixchatError

from . import moderated
from .requests import (
    ApiError,
    GenerationRequest,
    parse_chat,
    parse_completion,
    parse_json,
    parse_tokenize,
)
from .scheduler import Delta, Done, Job, Loaded, Scheduler

MAX_BODY = 8 << 20  # bytes
DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) up to this before the 413


def build_app(
    scheduler: Scheduler, *, api_key: str | None = None, max_body: int = MAX_BODY,
    safe: bool = False, policy=None,
) -> Starlette:  # fmt: skip
    """`safe`: every chat completion moderated (a request's `moderation` overrides it);
    `policy`: the moderation policy (default: the lexical guard)."""
    models = scheduler.models

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "a valid API key is needed: 'Authorization: Bearer KEY'",
                           code="invalid_api_key")  # fmt: skip

    async def read_body(request: Request) -> dict:
        data, total = bytearray(), 0
        async for part in request.stream():
            total += len(part)
            if total <= max_body:
                data += part
            elif total > DRAIN_LIMIT:  # not worth reading on: the connection just closes
                break
        # An oversized body is read to its end (up to DRAIN_LIMIT) before the 413, so the
        # client, still sending, reads the answer instead of a reset connection.
        if total > max_body:
            raise ApiError(413, f"the body is over the server's {max_body}-byte limit",
                           code="too_large")  # fmt: skip
        return parse_json(bytes(data))

    async def generate(request: Request, parse) -> Response:
        check_key(request)
        body = await read_body(request)
        gen: GenerationRequest = parse(body)
        key = await run_in_threadpool(models.resolve, gen.model, gen.adapter)
        job = Job(gen, key, asyncio.get_running_loop())
        if moderated.wanted(body, gen, safe):
            if flagged := await run_in_threadpool(moderated.check_prompt, gen, policy):
                answer = moderated.refused(base(job), flagged, gen.stream)
                if not gen.stream:
                    return JSONResponse(answer)
                events = "".join(event(b) for b in answer) + "data: [DONE]\n\n"
                return Response(events, media_type="text/event-stream")
            job.guard = moderated.reply_guard(policy, gen)
        scheduler.submit(job)
        gone = asyncio.ensure_future(disconnected(request))
        streaming = False
        try:
            first = await next_event(job, gone)
            if isinstance(first, ApiError):
                raise first
            if first is None:  # the client went away while waiting
                return Response(status_code=204)
            if gen.stream:
                gone.cancel()  # StreamingResponse watches for the disconnect from here on
                streaming = True  # sse() cancels the job when the stream ends
                return StreamingResponse(
                    sse(job, first), media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )  # fmt: skip
            text, item = [], first
            while isinstance(item, Delta):
                if not await filtered(job, item):
                    text.append(item.text)
                item = await next_event(job, gone)
            if item is None:
                return Response(status_code=204)
            if isinstance(item, ApiError):
                raise item
            await settle(job)
            return JSONResponse(whole(job, "".join(text), item))
        finally:
            gone.cancel()
            if not streaming:
                scheduler.cancel(job)  # no-op once it is done

    async def sse(job: Job, first) -> AsyncIterator[str]:
        try:
            if job.request.kind == "chat":
                yield event(chunk(job, {"role": "assistant", "content": ""}))
            item = first
            while True:
                if isinstance(item, Delta):
                    if not await filtered(job, item):
                        yield event(chunk(job, text=item.text))
                elif isinstance(item, Done):
                    await settle(job)
                    yield event(chunk(job, finish=item))
                    if job.request.include_usage:
                        yield event(base(job, item.model) | {"choices": [], "usage": usage(item)})
                    yield "data: [DONE]\n\n"
                    return
                else:  # an error after the stream began: say so in the stream
                    yield event(item.body())
                    return
                item = await job.events.get()
        finally:
            scheduler.cancel(job)

    async def filtered(job: Job, delta: Delta) -> bool:
        """A moderated reply: True for text at or after a flagged sentence window (dropped;
        the job is cancelled at its next token). The checks run off the event loop: a guard
        model takes seconds, and the other requests go on meanwhile."""
        guard = getattr(job, "guard", None)
        if guard is None:
            return False
        if guard.result is not None:
            return True
        if await run_in_threadpool(guard.feed, delta.text) is not None:
            scheduler.cancel(job)
        return False

    async def settle(job: Job) -> None:
        """The reply ended: the guard's last check (the unfinished sentence, the guard model
        on what came since its last look), off the event loop, before the last chunk."""
        guard = getattr(job, "guard", None)
        if guard is not None and guard.result is None:
            await run_in_threadpool(guard.finish)

    def finish_reason(job: Job, done: Done) -> str:
        guard = getattr(job, "guard", None)
        if guard is not None and guard.result is not None:
            return moderated.CONTENT_FILTER
        return openai_reason(done.finish_reason)

    def flagged_json(job: Job) -> dict:
        guard = getattr(job, "guard", None)
        return {"moderation": guard.result.to_json()} if guard and guard.result else {}

    def base(job: Job, model: str | None = None) -> dict:
        chat = job.request.kind == "chat"
        return {
            "id": ("chatcmpl-" if chat else "cmpl-") + job.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": job.created,
            "model": model or models.name(job.key, job.request.model),
        }

    def chunk(job: Job, delta: dict | None = None, *, text: str = "", finish: Done | None = None):
        reason = None if finish is None else finish_reason(job, finish)
        if job.request.kind == "chat":
            delta = delta if delta is not None else {} if finish else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        body = base(job, finish.model if finish else None) | {"choices": [choice]}
        if finish is not None:
            body["mixchat"] = engine_stats(finish)
            body |= flagged_json(job)
        return body

    def whole(job: Job, text: str, done: Done) -> dict:
        reason = finish_reason(job, done)
        if job.request.kind == "chat":
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
            body = base(job, done.model) | {"object": "chat.completion"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            body = base(job, done.model)
        return body | {"choices": [choice], "usage": usage(done), "mixchat": engine_stats(done)} | flagged_json(job)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, parse_chat)

    async def completions(request: Request) -> Response:
        return await generate(request, parse_completion)

    async def tokenize(request: Request) -> Response:
        """mixchat's own: the model (loaded if need be, through the queue), its description,
        and the prompt length of `messages` if given (what a chat client checks the context
        with). The tokenizer runs here, off the worker thread: it uses no MLX."""
        check_key(request)
        gen = parse_tokenize(await read_body(request))
        key = await run_in_threadpool(models.resolve, gen.model, gen.adapter)
        engine = models.engine if models.key == key else None
        if engine is None:
            job = Job(gen, key, asyncio.get_running_loop())
            scheduler.submit(job)
            gone = asyncio.ensure_future(disconnected(request))
            try:
                item = await next_event(job, gone)
            finally:
                gone.cancel()
                scheduler.cancel(job)
            if item is None:
                return Response(status_code=204)
            if isinstance(item, ApiError):
                raise item
            assert isinstance(item, Loaded)
            engine = item.engine
        tokens = None
        if gen.messages is not None:
            try:
                tokens = await run_in_threadpool(_count_tokens, engine, gen)
            except MixchatError as e:
                raise ApiError(400, str(e), code="invalid_request") from None
        info = engine.info.as_dict() if engine.info is not None else None
        return JSONResponse({
            "model": models.name(key, gen.model), "prompt_tokens": tokens,
            "context_length": engine.context_length,
            "has_chat_template": engine.has_chat_template,
            "thinking_default": getattr(engine, "thinking_default", None),
            "memory_notice": engine.memory_notice, "info": info,
        })  # fmt: skip

    async def moderations(request: Request, openai: bool = True) -> Response:
        """OpenAI's /v1/moderations and Mistral's /v1/chat/moderations (app/moderation/api.py),
        by the server's policy (the lexical guard, and the --guard-model if one was given), off
        the event loop."""
        from app.moderation import api
        from app.moderation.policy import default_policy

        check_key(request)
        body = await read_body(request)
        answer = api.moderations if openai else api.chat_moderations
        try:
            return JSONResponse(await run_in_threadpool(answer, policy or default_policy(), body))
        except MixchatError as e:
            raise ApiError(400, str(e), code="invalid_value", param="input") from None

    async def chat_moderations(request: Request) -> Response:
        return await moderations(request, openai=False)

    async def list_models(request: Request) -> Response:
        check_key(request)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "mixchat"}
                for name in models.listed()]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        loaded = models.engine is not None
        return JSONResponse({
            "status": "ok", "server": "mixchat",
            "model": models.name(models.key) if loaded else None,
            "loads": models.loads,
        } | scheduler.status())  # fmt: skip

    async def api_error(request: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                         code=code)  # fmt: skip
        return JSONResponse(error.body(), status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(error.body(), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/mixchat/tokenize", tokenize, methods=["POST"]),
        Route("/v1/moderations", moderations, methods=["POST"]),
        Route("/v1/chat/moderations", chat_moderations, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


def openai_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def usage(done: Done) -> dict:
    cached = done.prompt_tokens - done.stats.prompt_tokens
    completion = done.stats.generation_tokens
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": done.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def engine_stats(done: Done) -> dict:
    """The engine's own figures (tok/s, memory, expert cache), in an extra `mixchat` field:
    GenerationStats' one JSON form, with the request's finish reason, the memory notice, and
    the model unloaded to load this request's (`replaced_model`, else null)."""
    return done.stats.to_json() | {"finish_reason": done.finish_reason,
                                   "memory_notice": done.notice,
                                   "replaced_model": done.replaced}  # fmt: skip


def event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def disconnected(request: Request) -> None:
    """Return once the client has closed the connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def next_event(job: Job, gone: asyncio.Future):
    """The job's next item, or None if the client disconnected first."""
    getter = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    return None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound now so a port in use is a one-line error before loading."""
    from model.errors import MixchatError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise MixchatError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, whose shutdown first ends the replies in progress: each stream gets
    a "shutting down" error at its next token, instead of running on through uvicorn's
    graceful wait and being cut mid-reply."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler):
        super().__init__(config)
        self.scheduler = scheduler

    async def shutdown(self, sockets=None) -> None:
        await run_in_threadpool(self.scheduler.stop)
        await super().shutdown(sockets)


def make_server(app: Starlette, scheduler: Scheduler, log_level: str = "info") -> uvicorn.Server:
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3, lifespan="on")
    return _Server(config, scheduler)


class ServerThread:
    """The server on a background thread (tests, benchmarks): `with ServerThread(...) as s:`."""

    def __init__(self, scheduler: Scheduler, host: str = "127.0.0.1", port: int = 0, **kw):
        self.scheduler = scheduler
        self.sock = bind(host, port)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.server = make_server(build_app(scheduler, **kw), scheduler, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)  # fmt: skip

    def __enter__(self) -> ServerThread:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            self.thread.join(0.02)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def _count_tokens(engine, gen: GenerationRequest) -> int:
    """The prompt length of a tokenize request's messages, rendered with its
    `chat_template_kwargs` as a chat completion with them would be."""
    from model.tokenizer.hf import template_options

    with template_options(**gen.template_kwargs):
        return engine.count_tokens(gen.messages)
