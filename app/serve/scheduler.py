"""A fair bounded FIFO queue in front of the engine, and the worker thread that serves it.

Requests are admitted in arrival order (beyond `max_queue` waiting requests, 429). Up to `batch`
of them are active at once: each new one is prefilled on its own (between decode steps, one
chunk at a time), then decodes with the others in one batch (batch.py), and leaves the batch as
soon as it is done (model/generation/batch.py's BatchGenerator). An engine that cannot batch
(batch_limit: experts streamed under a memory budget, several ranks, a quantized or
sliding-window KV cache) serves one request at a time through Engine.stream_ids, as does
`batch=1`. A request whose client has gone is dropped from the queue, or stopped
at its next token. Results go back to the request's asyncio queue as Delta, Done or ApiError.
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
from model.generate import Engine, GenerationStats
from model.generation.batch import BatchGenerator, RowEvent
from model.generation.limit import DEFAULT_BATCH, batch_limit
from model.generation.row import Row
from model.generation.stops import stop_at

from .models import ModelManager
from .requests import ApiError, GenerationRequest


@dataclass
class Delta:
    text: str


@dataclass
class Loaded:
    engine: Engine  # a "load" job's answer: the model is loaded (its tokenizer may be used)


@dataclass
class Done:
    finish_reason: str  # "stop" | "length" (OpenAI's), or "cancelled"
    prompt_tokens: int  # the whole prompt (OpenAI's usage), cached tokens included
    stats: GenerationStats
    model: str
    notice: str  # the engine's one-line memory notice (what was chosen for the user), or ""
    replaced: str | None = None  # the model unloaded to load this request's, if any


class Job:
    """One request: what to generate, and where its results go (an asyncio queue)."""

    def __init__(self, request: GenerationRequest, key: str, loop: asyncio.AbstractEventLoop):
        self.request, self.key, self.loop = request, key, loop
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.events: asyncio.Queue = asyncio.Queue()
        self.state = "queued"  # -> "running" -> "done"
        self.cancelled = False
        self.chunks = 0  # generated-text chunks read so far (a token each, at most; alone)
        self.chunks_at_cancel: int | None = None
        self.done: Done | None = None
        self.row: Row | None = None  # while it runs in a batch
        self.replaced: str | None = None  # the model unloaded to load this job's

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class Scheduler:
    def __init__(self, models: ModelManager, max_queue: int = 32, batch: int | None = None):
        self.models = models
        self.max_queue = max_queue
        self.batch = batch  # the most requests decoded together (None: the model's default)
        self.history: collections.deque[Job] = collections.deque(maxlen=256)  # finished jobs
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._serial: Job | None = None  # the job the engine runs on its own (batch of one)
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.limit, self.limit_reason = batch or DEFAULT_BATCH, ""  # for the loaded model
        self._limited: Engine | None = None  # the engine self.limit is for
        # decode passes (a one-at-a-time reply's tokens too), those with > 1 row, the most rows
        self.steps = self.batched_steps = self.largest_batch = 0
        if models.engine is not None:  # loaded before serving: /health is right from the start
            self._set_limit(models.engine)

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
            for job in self._active:
                self._cancel_active(job)
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
            if job.state == "queued":
                job.cancelled = True
                try:
                    self._waiting.remove(job)
                except ValueError:
                    pass
                job.state = "done"
                self.history.append(job)
            elif job in self._active:
                self._cancel_active(job)

    def _cancel_active(self, job: Job) -> None:
        """Stop a running job at its next token (under the lock)."""
        if job.cancelled:
            return
        job.cancelled = True
        if job.row is not None:
            job.chunks_at_cancel = len(job.row.generated)
            job.row.cancel()
        else:
            job.chunks_at_cancel = job.chunks
        if job is self._serial and self.models.engine is not None:
            self.models.engine.cancel()

    def status(self) -> dict:
        """/health's figures. `batch` is the limit for the loaded model; with none loaded
        (before the first request, or after --keep-alive) it is null, and says why."""
        with self._lock:
            loaded = self.models.engine is not None and self.models.engine is self._limited
            limit = self.limit if loaded else None
            reason = self.limit_reason if loaded else "no model is loaded: set when one is"
            return {
                "queued": len(self._waiting), "active": len(self._active),
                "batch": limit, "batch_limited_because": reason or None,
                "decode_steps": self.steps, "batched_steps": self.batched_steps,
                "largest_batch": self.largest_batch,
            }  # fmt: skip

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
                job = self._admit()
            engine = self._engine_for(job)
            if engine is None:
                continue
            if job.request.kind == "load":
                self._loaded(job, engine)
            elif self.limit > 1:
                self._run_batch(engine, job)
            else:
                with self._lock:
                    self._serial = job
                self._finish(job, self._generate)

    def _admit(self) -> Job:
        """The next waiting job, now running (under the lock)."""
        job = self._waiting.popleft()
        job.state = "running"
        self._active.append(job)
        return job

    def _engine_for(self, job: Job) -> Engine | None:
        """Load the job's model (None, the job answered, if that fails); sets the batch limit."""
        loads = self.models.loads
        try:
            engine = self.models.engine_for(job.key)
        except Exception as e:
            self._fail(job, e)
            return None
        if self.models.loads != loads:  # loaded for this job: in place of another model?
            job.replaced = self.models.replaced
        if engine is not self._limited:
            self._set_limit(engine)
        return engine

    def _set_limit(self, engine: Engine) -> None:
        """The batch limit for `engine`, now loaded (said in one line when it is 1)."""
        limit, reason = batch_limit(engine, self.batch)
        with self._lock:
            self._limited, self.limit, self.limit_reason = engine, limit, reason
        if reason:
            print(f"mixchat serve: one request at a time for this model: {reason}",
                  file=sys.stderr)  # fmt: skip

    def _finish(self, job: Job, work) -> None:
        """Run `work(job)`, a failure becoming the job's API error; then retire the job."""
        try:
            work(job)
        except Exception as e:
            self._fail(job, e)
        else:
            self._retire(job)

    def _fail(self, job: Job, error: Exception) -> None:
        """Answer `job` with the API error for `error` (500 for a bug) and retire it."""
        if isinstance(error, MixchatError):
            job.emit(ApiError(400, str(error), code="invalid_request"))
        else:  # a bug: the request gets a 500, the server keeps serving
            traceback.print_exception(error, file=sys.stderr)
            job.emit(ApiError(500, f"internal error: {type(error).__name__}: {error}",
                              "server_error", "internal_error"))  # fmt: skip
        self._retire(job)

    def _retire(self, job: Job) -> None:
        with self._lock:
            if job.state == "done":
                return
            if job in self._active:
                self._active.remove(job)
            if self._serial is job:
                self._serial = None
            job.state, job.row = "done", None
            self.history.append(job)

    def _prompt_ids(self, engine: Engine, request: GenerationRequest) -> list[int]:
        if request.kind == "chat":
            from model.tokenizer.hf import template_options

            with template_options(**request.template_kwargs):  # chat_template_kwargs
                return engine.prompt_ids(messages=request.messages)
        if isinstance(request.prompt, str):
            return engine.prompt_ids(prompt=request.prompt)  # BOS, then the text: as stream_text
        ids = list(request.prompt)
        if max(ids) >= engine.tokenizer.vocab_size:
            raise MixchatError(f"token id {max(ids)} is outside the vocabulary "
                               f"({engine.tokenizer.vocab_size} tokens)")  # fmt: skip
        return ids

    def _generate(self, job: Job) -> None:
        """Run one request on the engine on its own (worker thread)."""
        engine = self.models.engine_for(job.key)
        request = job.request
        ids = self._prompt_ids(engine, request)
        self.models.take_cache(engine, ids)
        try:
            chunks = engine.stream_ids(ids, request.settings)  # checks the context now
            with self._lock:
                if job.cancelled:
                    engine.cancel()
            stats, counted = None, 0
            for chunk in stop_at(chunks, request.stop, engine.cancel):
                if chunk.progress is not None:  # still reading the prompt: no token yet
                    continue
                job.chunks += 1
                if chunk.text:
                    job.emit(Delta(chunk.text))
                stats = chunk.stats or stats
                if chunk.stats is None:  # a token decoded: a step of one row
                    self._count_step(1)
                    counted += 1
        finally:
            self.models.keep_cache(engine)
        assert stats is not None
        for _ in range(stats.generation_tokens - counted):  # tokens that brought no text yet
            self._count_step(1)
        reason = "cancelled" if job.cancelled else stats.finish_reason
        self._done(job, engine, reason, len(ids), stats)

    def _loaded(self, job: Job, engine: Engine) -> None:
        self._retire(job)
        job.emit(Loaded(engine))

    def _done(self, job: Job, engine: Engine, reason: str, prompt: int, stats) -> None:
        """Retire the job, then send its end (so /health no longer counts it once it is seen)."""
        name = self.models.name(job.key, job.request.model)
        job.done = Done(reason, prompt, stats, name, engine.memory_notice, job.replaced)
        self._retire(job)
        if reason == "cancelled" and self._stopping:  # not the client's doing: say why it ended
            job.emit(ApiError(503, "the server is shutting down", "server_error", "shutting_down"))
        else:
            job.emit(job.done)

    # Batched decoding ----------------------------------------------------------------------

    def _start_row(self, generator: BatchGenerator, jobs: dict[int, Job], job: Job) -> None:
        """Insert the job's Row, its prompt not yet read (the job answered on a bad request)."""
        engine, request = generator.batch.engine, job.request
        try:
            ids = self._prompt_ids(engine, request)
            row = Row(engine, ids, request.settings, request.stop, self.models.fetch_cache)
        except Exception as e:
            self._fail(job, e)
            return
        with self._lock:
            job.row = row
            if job.cancelled:  # cancelled while its row was made
                row.cancel()
        jobs[id(row)] = job
        generator.insert(row)

    def _run_batch(self, engine: Engine, first: Job) -> None:
        """Serve jobs on the loaded model in one batch until none is left to serve on it."""
        generator = BatchGenerator(engine)
        jobs: dict[int, Job] = {}  # id(row) -> job
        self._start_row(generator, jobs, first)
        while True:
            with self._lock:
                if self._stopping:
                    for job in self._active:
                        self._cancel_active(job)
                if generator.reading is None and len(generator) < self.limit and self._waiting and (
                    self._waiting[0].key == self.models.key
                ):  # fmt: skip
                    job = self._admit()
                else:
                    job = None
            if job is not None and job.request.kind == "load":
                self._loaded(job, engine)
            elif job is not None:
                self._start_row(generator, jobs, job)
            if not len(generator):
                return  # nothing more for this model now: the outer loop waits or switches
            try:
                events = generator.step()
            except Exception as e:  # a bug or a failed step: every row's request gets a 500
                traceback.print_exc(file=sys.stderr)
                error = ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error",
                                 "internal_error")  # fmt: skip
                for row in generator.clear():
                    job = jobs.pop(id(row))
                    job.emit(error)
                    self._retire(job)
                continue
            self._count_step(generator.decoded)
            for event in events:
                self._send(engine, jobs, event)

    def _count_step(self, rows: int) -> None:
        """/health's figures: decode steps, those with more than one row, the largest."""
        if rows:
            self.steps += 1
            self.batched_steps += rows > 1
            self.largest_batch = max(self.largest_batch, rows)

    def _send(self, engine: Engine, jobs: dict[int, Job], event: RowEvent) -> None:
        """A row's text to its job; once the row is done, its KV cache kept for its
        conversation's next turn and the job's end."""
        job = jobs[id(event.row)]
        for text in event.text:
            job.emit(Delta(text))
        if event.stats is None:
            return
        jobs.pop(id(event.row))
        if event.kept is not None:
            self.models.keep_row_cache(*event.kept)
        self._done(job, engine, event.stats.finish_reason, len(event.row.ids), event.stats)
