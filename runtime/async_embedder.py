"""``AsyncEmbedder``: the asyncio face of the runtime, with dynamic batching.

Callers tokenize off the event loop (a thread pool), then enqueue their
token sequences. A worker thread takes queued inputs by priority (lower
first, FIFO within a priority), cuts them into length-sorted token-budget
batches and runs them; with ``RuntimeOptions.batch_workers`` above 1, that
many workers run a take's batches at once (each on its share of the
onnxruntime threads), and the next take waits until its batches are all
started. There is no timed wait: while batches run, new work piles up and
forms the next take, so an idle server answers at once and a busy one
batches. The queue is bounded (OverloadedError past it); a cancelled
caller's inputs are skipped; a failing batch fails only its callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

from toolkit.errors import BackendError, NotReadyError, OverloadedError, RequestError, ToolkitError
from toolkit.runtime.batching import plan_batches
from toolkit.runtime.embedder import Embedder
from toolkit.runtime.encoders import declared_modality
from toolkit.runtime.images import Pixels
from toolkit.runtime.pooling import Inputs
from toolkit.runtime.tasks import Prepared, require, task_for
from toolkit.runtime.tokenization import Tokenized

__all__ = ["BATCH_LANE", "AsyncEmbedder", "BatchStats", "Timings", "queue_lane"]

# Added to the priority of every input queued from this context (set by a task, inherited by the tasks it starts):
# the server's Batch API sets BATCH_LANE, above every request's priority, so its lines wait for online work; the
# worker never mixes that lane's inputs with others in a take, and takes them in small batches (1/8 of the token
# budget), so an online request waits for one small batch at most and is never padded to a batch line's length.
BATCH_LANE = 10_000
queue_lane: ContextVar[int] = ContextVar("toolkit_queue_lane", default=0)


@dataclass
class Timings:
    """Seconds spent per phase of one request."""

    tokenize: float = 0.0
    queue: float = 0.0
    inference: float = 0.0


@dataclass
class BatchStats:
    size: int
    tokens: int
    seconds: float


@dataclass(eq=False)  # hashed by identity: a batch's distinct jobs are dict.fromkeys of them
class _Job:
    items: Sequence[Tokenized]
    output: str
    modality: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float
    results: list = field(default_factory=list)
    remaining: int = 0
    started: float = 0.0
    inference: float = 0.0
    failed: bool = False
    adapter: str | None = None  # the LoRA adapter its rows run with (None: the base model)



class AsyncEmbedder:
    """Coalesces concurrent callers into shared batches on ``batch_workers`` worker threads."""

    def __init__(self, embedder: Embedder, *, max_queue: int | None = None,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_request: Callable[[Timings, int], None] | None = None) -> None:
        """``on_batch``: told each batch run; ``on_request``: told each completed task's phases and tokens."""
        self.embedder = embedder
        self.max_queue = max_queue or embedder.options.max_queue
        self._on_batch = on_batch
        self._on_request = on_request
        self.adapter = embedder.adapter  # the LoRA adapter a call runs with unless it names one (None: the base)
        self._heap: list[tuple[int, int, int, _Job]] = []  # (priority, seq, item index, job)
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._admitted = [0]  # inputs of requests between admission and their answer (shared with the views)
        self.last_error: str | None = None
        # batches of the current take not yet started: (graph output key, the take's entries of that key, rows)
        self._ready: deque[tuple[tuple[str, str, str | None], list[tuple[int, _Job]], list[int]]] = deque()
        self._done = threading.Lock()  # the jobs' results and counts, written by every worker
        self._workers = [threading.Thread(target=self._loop, name=f"toolkit-batcher-{n}", daemon=True)
                         for n in range(embedder.options.batch_workers or 1)]
        for worker in self._workers:
            worker.start()

    def for_adapter(self, adapter: str | None) -> AsyncEmbedder:
        """A view of this engine whose calls run with LoRA ``adapter`` (None: the base model): the same batcher,
        queue and bound, so requests for the base and for every adapter share batches' turns (a batch holds one
        adapter's rows). RequestError naming the adapters for an unknown one."""
        self.embedder.context.adapter(adapter)
        view = copy.copy(self)
        view.adapter = adapter
        return view

    # ---------------------------------------------------------------- status
    @property
    def queue_depth(self) -> int:
        return len(self._heap)

    @property
    def admitted(self) -> int:
        """Inputs of requests between admission and their answer (tokenizing, queued or running), all views'."""
        return self._admitted[0]

    @property
    def alive(self) -> bool:
        return all(worker.is_alive() for worker in self._workers) and not self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join(timeout=5)

    # ---------------------------------------------------------------- callers
    @contextlib.contextmanager
    def admit(self, n_inputs: int):
        """Reserve room for ``n_inputs`` before any work is done on them: OverloadedError (429) at once
        when the inputs already admitted (tokenizing, queued or running) would pass ``max_queue``."""
        if self._admitted[0] + n_inputs > self.max_queue:
            raise OverloadedError(f"the server holds {self._admitted[0]} inputs already (limit {self.max_queue}); "
                                  "retry shortly")
        self._admitted[0] += n_inputs
        try:
            yield
        finally:
            self._admitted[0] -= n_inputs

    async def run(self, items: Sequence[Tokenized], output: str, *, modality: str = "text", priority: int = 0,
                  timings: Timings | None = None, adapter: str | None = None) -> list[np.ndarray]:
        """Each input's row of ``output`` (with LoRA ``adapter`` active; None: the base), in order; equal to
        running it alone."""
        if not self.alive:
            raise NotReadyError("the inference worker is not running")
        loop = asyncio.get_running_loop()
        job = _Job(items, output, modality, loop, loop.create_future(), time.perf_counter(),
                   results=[None] * len(items), remaining=len(items), adapter=adapter)
        priority += queue_lane.get()
        with self._cond:
            if len(self._heap) + len(items) > self.max_queue:
                raise OverloadedError(f"the queue is full ({len(self._heap)} inputs waiting); retry shortly")
            for index in range(len(items)):
                heapq.heappush(self._heap, (priority, next(self._seq), index, job))
            self._cond.notify()
        try:
            result = await job.future
        except asyncio.CancelledError:
            job.failed = True  # the worker skips what is still queued
            raise
        if timings is not None:
            timings.queue = job.started - job.enqueued
            timings.inference = job.inference
        return result

    async def perform(self, task: str, *inputs, priority: int = 0, timings: Timings | None = None,
                      max_tokens: int | None = None, **params) -> tuple[object, Prepared]:
        """(result, its Prepared: tokens, images) of the task table's ``task``, as ``Embedder.perform`` gives it.

        The inputs are admitted first (OverloadedError past the queue bound, before any work), prepared on the
        event loop when small or in a thread, bounded by ``max_tokens`` (RequestError past it), and every run is
        queued on the shared batcher at ``priority``. ``adapter=`` (every task takes it): the LoRA adapter for this
        call instead of this engine's (None: the base).
        """
        entry = task_for(task)
        timings = timings if timings is not None else Timings()
        ctx = self.embedder.context
        require(ctx, entry.name)
        adapter = ctx.task_adapter(params, self.adapter, takes_prompt=entry.takes_prompt)
        ctx.adapter(adapter)  # an unknown name fails before any work
        with self.admit(entry.count(ctx, *inputs)):
            started = time.perf_counter()
            if entry.inline(*inputs):
                prepared = entry.prepare(ctx, *inputs, **params)
            else:
                prepared = await asyncio.to_thread(entry.prepare, ctx, *inputs, **params)
            if max_tokens is not None and prepared.tokens > max_tokens:
                raise RequestError(f"the request has {prepared.tokens} tokens; the limit is {max_tokens}",
                                   param=entry.param)
            timings.tokenize = time.perf_counter() - started
            rows = await asyncio.gather(*(self.run(run.items, run.output, modality=run.modality, priority=priority,
                                                   timings=timings, adapter=adapter)
                                          for run in prepared.runs))
        result = prepared.reduce(list(rows))
        if self._on_request is not None:
            self._on_request(timings, prepared.tokens)
        return result, prepared

    async def embed(self, inputs: Inputs, **params) -> tuple[np.ndarray, int]:
        """(vectors (n, d) float32, prompt tokens) like ``Embedder.embed`` for these inputs alone."""
        vectors, prepared = await self.perform("embed", inputs, **params)
        return vectors, prepared.tokens

    async def embed_images(self, images, **params) -> tuple[np.ndarray, list[Pixels]]:
        """(vectors (n, d) float32, the decoded images) like ``Embedder.embed_images``: decoded and preprocessed
        off the event loop (the embedder's bounded pool), then batched with everyone else's images."""
        vectors, prepared = await self.perform("embed_images", images, **params)
        return vectors, prepared.images

    async def embed_mixed(self, inputs: list, **params) -> tuple[np.ndarray, int, list[Pixels]]:
        """(vectors in input order, tokens, the decoded images) for a list of texts and ``ImageRef`` images
        (two-tower artifacts): each kind through its own tower, concurrently; an image counts the positions its
        tower reads as tokens. A text is a text, whatever it says (``declared_modality``)."""
        vectors, prepared = await self.perform("embed_mixed", inputs, modality=declared_modality, **params)
        return vectors, prepared.tokens, prepared.images

    async def score(self, queries, documents, **params) -> tuple[np.ndarray, int]:
        """(scores, prompt tokens) like ``Embedder.score``: pair scores of a cross-encoder, cosines otherwise."""
        scores, prepared = await self.perform("score", queries, documents, **params)
        return scores, prepared.tokens

    async def rerank(self, query: str, documents, **params) -> tuple[list[dict], int]:
        """(documents best first, prompt tokens) like ``Embedder.rerank``."""
        ranked, prepared = await self.perform("rerank", query, documents, **params)
        return ranked, prepared.tokens

    async def classify(self, inputs: Inputs, **params) -> tuple[np.ndarray, int]:
        """((n, labels) per-label scores, prompt tokens) like ``Embedder.classify``."""
        scores, prepared = await self.perform("classify", inputs, **params)
        return scores, prepared.tokens

    async def embed_tokens(self, inputs: Inputs, **params) -> tuple[list[np.ndarray], int]:
        """(per input a (tokens, hidden) array of encoder states, prompt tokens), like ``Embedder.encode``'s
        token_embed."""
        states, prepared = await self.perform("token_embed", inputs, **params)
        return states, prepared.tokens

    async def embed_multi(self, texts, *, is_query: bool | None = None, **params) -> tuple[list[np.ndarray], int]:
        """(per text its (tokens, dim) vectors in query or document mode, prompt tokens), like
        ``Embedder.embed_multi`` (a late-interaction artifact)."""
        vectors, prepared = await self.perform("token_embed", texts, is_query=is_query, **params)
        return vectors, prepared.tokens

    async def embed_sparse(self, inputs: Inputs, **params) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
        """(per input its (indices, weights) of non-zero vocabulary entries, prompt tokens), like
        ``Embedder.embed_sparse``."""
        entries, prepared = await self.perform("embed_sparse", inputs, **params)
        return entries, prepared.tokens

    # ---------------------------------------------------------------- worker
    def _take(self) -> list[tuple[int, _Job]]:
        """Pop queued inputs by priority until the padded-token budget is spent."""
        options = self.embedder.options
        taken: list[tuple[int, _Job]] = []
        longest = 0
        background = None  # whether this take is the Batch API's lane: lanes never share a take
        while self._heap and len(taken) < options.max_batch_size * 4:
            priority, _, index, job = self._heap[0]
            if job.failed:
                heapq.heappop(self._heap)
                continue
            length = len(job.items[index])
            if background is None:
                background = priority >= BATCH_LANE
            elif background != (priority >= BATCH_LANE):
                break
            budget = options.max_batch_tokens // 8 if background else options.max_batch_tokens * 4
            if taken and (len(taken) + 1) * max(longest, length) > budget:
                break
            heapq.heappop(self._heap)
            longest = max(longest, length)
            taken.append((index, job))
        return taken

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                if not self._ready:
                    self._plan(self._take())
                    if len(self._ready) > 1:
                        self._cond.notify_all()  # the other workers start this take's other batches
                if not self._ready:
                    continue
                key, entries, batch = self._ready.popleft()
            self._run(key, entries, batch)

    def _plan(self, taken: list[tuple[int, _Job]]) -> None:
        """Cut a take into length-sorted batches of one graph output, modality and adapter each, onto the
        ready queue."""
        now = time.perf_counter()
        for _, job in taken:
            if not job.started:
                job.started = now
        by_output: dict[tuple[str, str, str | None], list[tuple[int, _Job]]] = {}
        for entry in taken:
            by_output.setdefault((entry[1].modality, entry[1].output, entry[1].adapter), []).append(entry)
        options = self.embedder.options
        for key, entries in by_output.items():
            lengths = [len(job.items[i]) for i, job in entries]
            for batch in plan_batches(lengths, max_batch_tokens=options.max_batch_tokens,
                                      max_batch_size=options.max_batch_size):
                self._ready.append((key, entries, batch))

    def _run(self, key: tuple[str, str, str | None], entries: list[tuple[int, _Job]], batch: list[int]) -> None:
        modality, output, adapter = key
        chosen = [entries[b] for b in batch]
        started = time.perf_counter()
        try:
            (out,) = self.embedder.run_batch([job.items[i] for i, job in chosen], [output], modality, adapter)
        except ToolkitError as exc:
            self.last_error = exc.message
            self._fail(dict.fromkeys(job for _, job in chosen), exc)
            return
        except Exception as exc:  # noqa: BLE001 - never let a worker die
            self.last_error = str(exc)
            self._fail(dict.fromkeys(job for _, job in chosen), BackendError(f"inference failed: {exc}"))
            return
        seconds = time.perf_counter() - started
        self.last_error = None
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(chosen), len(chosen) * max(len(job.items[i]) for i, job in chosen),
                                      seconds))
        with self._done:
            for job in dict.fromkeys(job for _, job in chosen):
                job.inference += seconds
            for row, (index, job) in enumerate(chosen):
                if job.failed:
                    continue
                job.results[index] = out[row].copy()
                job.remaining -= 1
                if job.remaining == 0:
                    job.loop.call_soon_threadsafe(_resolve, job.future, job.results)

    def _fail(self, jobs, exc: Exception) -> None:
        with self._done:
            for job in jobs:
                if not job.failed:
                    job.failed = True
                    job.loop.call_soon_threadsafe(_reject, job.future, exc)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future, exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
