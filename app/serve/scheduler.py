"""One generation at a time, in arrival order: a bounded FIFO queue in front of the engine.

The engine is single-stream, so requests are answered one after another by one worker thread
(FIFO per arrival; beyond `max_queue` waiting requests, 429). A request whose client has gone
is dropped from the queue, or, if it is the one generating, cancelled at its next token.
Results go back to the request's asyncio queue as Delta, Done or ApiError items.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass

from model.errors import MixchatError
from model.generate import GenerationStats

from .models import ModelManager
from .requests import ApiError, GenerationRequest
from .stops import StopText


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    finish_reason: str  # "stop" | "length" (OpenAI's), or "cancelled"
    prompt_tokens: int  # the whole prompt (OpenAI's usage), cached tokens included
    stats: GenerationStats
    model: str
    notice: str  # the engine's one-line memory notice (what was chosen for the user), or ""


class Job:
    """One request: what to generate, and where its results go (an asyncio queue)."""

    def __init__(self, request: GenerationRequest, key: str, loop: asyncio.AbstractEventLoop):
        self.request, self.key, self.loop = request, key, loop
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.events: asyncio.Queue = asyncio.Queue()
        self.state = "queued"  # -> "running" -> "done"
        self.cancelled = False
        self.chunks = 0  # generated-text chunks read so far (a token each, at most)
        self.chunks_at_cancel: int | None = None
        self.done: Done | None = None

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class Scheduler:
    def __init__(self, models: ModelManager, max_queue: int = 32):
        self.models = models
        self.max_queue = max_queue
        self.history: collections.deque[Job] = collections.deque(maxlen=256)  # finished jobs
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: Job | None = None
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mixchat-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and end the worker thread."""
        with self._lock:
            self._stopping = True
            for job in self._waiting:
                job.cancelled = True
            self._waiting.clear()
            if self._active is not None:
                self._cancel_active()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise ApiError(429, f"the server is busy: {len(self._waiting)} requests are "
                               "already waiting; retry later", "rate_limit_exceeded",
                               "queue_full")  # fmt: skip
            self._waiting.append(job)
            self._lock.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if waiting, stop it at its next token if running.
        A finished job is left alone."""
        with self._lock:
            if job.state == "done" or job.cancelled or job.done is not None:
                return
            job.cancelled = True
            if job.state == "queued":
                try:
                    self._waiting.remove(job)
                except ValueError:
                    pass
                job.state = "done"
                self.history.append(job)
            elif self._active is job:
                self._cancel_active()

    def _cancel_active(self) -> None:
        job = self._active
        assert job is not None
        job.chunks_at_cancel = job.chunks
        if self.models.engine is not None:
            self.models.engine.cancel()

    def status(self) -> dict:
        with self._lock:
            return {"queued": len(self._waiting), "active": int(self._active is not None)}

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    deadline = self.models.idle_deadline()
                    if deadline is not None and time.monotonic() >= deadline:
                        self.models.unload()  # keep-alive ran out
                        continue
                    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                    self._lock.wait(timeout)
                if self._stopping:
                    return
                job = self._waiting.popleft()
                job.state = "running"
                self._active = job
            try:
                self._generate(job)
            except MixchatError as e:
                job.emit(ApiError(400, str(e), code="invalid_request"))
            except Exception as e:  # a bug: the request gets a 500, the server keeps serving
                traceback.print_exc(file=sys.stderr)
                job.emit(ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error",
                                  "internal_error"))  # fmt: skip
            finally:
                with self._lock:
                    self._active = None
                    job.state = "done"
                    self.history.append(job)

    def _generate(self, job: Job) -> None:
        """Run one request on the engine (worker thread)."""
        engine = self.models.engine_for(job.key)
        request = job.request
        if request.kind == "chat":
            ids = engine.prompt_ids(messages=request.messages)
        elif isinstance(request.prompt, str):
            ids = engine.prompt_ids(prompt=request.prompt)  # BOS, then the text: as stream_text
        else:
            ids = list(request.prompt)
            if max(ids) >= engine.tokenizer.vocab_size:
                raise MixchatError(f"token id {max(ids)} is outside the vocabulary "
                                   f"({engine.tokenizer.vocab_size} tokens)")  # fmt: skip
        self.models.take_cache(engine, ids)
        try:
            chunks = engine.stream_ids(ids, request.settings)  # checks the context now
            with self._lock:
                if job.cancelled:
                    engine.cancel()
            stops, stopped, stats = StopText(request.stop), False, None
            for chunk in chunks:
                if chunk.progress is not None:  # still reading the prompt: no token yet
                    continue
                job.chunks += 1
                if chunk.text and not stopped:
                    text, stopped = stops.add(chunk.text)
                    if text:
                        job.emit(Delta(text))
                    if stopped:
                        engine.cancel()  # ends at the next token; the cache stays consistent
                stats = chunk.stats or stats
            if not stopped and (tail := stops.flush()):
                job.emit(Delta(tail))
        finally:
            self.models.keep_cache(engine)
        assert stats is not None
        reason = "cancelled" if job.cancelled else "stop" if stopped else stats.finish_reason
        name = self.models.name(job.key, request.model)
        job.done = Done(reason, len(ids), stats, name, engine.memory_notice)
        job.emit(job.done)
