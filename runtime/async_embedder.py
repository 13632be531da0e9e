"""``AsyncEmbedder``: the asyncio face of the runtime, with dynamic batching.

Callers tokenize off the event loop (a thread pool), then enqueue their
token sequences. One worker thread takes queued inputs by priority (lower
first, FIFO within a priority), cuts them into length-sorted token-budget
batches and runs them. There is no timed wait: while one batch runs, new
work piles up and forms the next, so an idle server answers at once and a
busy one batches. The queue is bounded (OverloadedError past it); a
cancelled caller's inputs are skipped; a failing batch fails only its callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from toolkit.errors import BackendError, NotReadyError, OverloadedError, RequestError, ToolkitError
from toolkit.runtime.batching import plan_batches
from toolkit.runtime.embedder import (
    Embedder,
    Inputs,
    activate,
    cosine_scores,
    count_inputs,
    expand_chunks,
    interleave,
    pool_chunks,
    pool_sparse,
    score_pairs,
    sparse_entries,
    split_modalities,
)
from toolkit.runtime.images import ImageRef, Pixels, as_image_list
from toolkit.runtime.tokenization import Tokenized

__all__ = ["AsyncEmbedder", "BatchStats", "Timings"]


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


@dataclass
class _Job:
    items: Sequence[Tokenized]
    output: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float
    results: list = field(default_factory=list)
    remaining: int = 0
    started: float = 0.0
    inference: float = 0.0
    failed: bool = False


_INLINE_INPUTS = 8
_INLINE_CHARS = 4096


class AsyncEmbedder:
    """Coalesces concurrent callers into shared batches on one worker thread."""

    def __init__(self, embedder: Embedder, *, max_queue: int | None = None,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self.embedder = embedder
        self.max_queue = max_queue or embedder.options.max_queue
        self._on_batch = on_batch
        self._heap: list[tuple[int, int, int, _Job]] = []  # (priority, seq, item index, job)
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._admitted = 0  # inputs of requests between admission and their answer
        self.last_error: str | None = None
        self._worker = threading.Thread(target=self._loop, name="toolkit-batcher", daemon=True)
        self._worker.start()

    # ---------------------------------------------------------------- status
    @property
    def queue_depth(self) -> int:
        return len(self._heap)

    @property
    def alive(self) -> bool:
        return self._worker.is_alive() and not self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=5)

    # ---------------------------------------------------------------- callers
    @contextlib.contextmanager
    def admit(self, n_inputs: int):
        """Reserve room for ``n_inputs`` before any work is done on them: OverloadedError (429) at once
        when the inputs already admitted (tokenizing, queued or running) would pass ``max_queue``."""
        if self._admitted + n_inputs > self.max_queue:
            raise OverloadedError(f"the server holds {self._admitted} inputs already (limit {self.max_queue}); "
                                  "retry shortly")
        self._admitted += n_inputs
        try:
            yield
        finally:
            self._admitted -= n_inputs

    async def tokenize(self, inputs: Inputs, **kwargs) -> list[Tokenized]:
        """Small requests tokenize inline (a thread hop costs more, ~0.25 ms measured); big ones in a thread."""
        items = [inputs] if isinstance(inputs, str) else inputs
        if len(items) <= _INLINE_INPUTS and sum(len(x) for x in items if isinstance(x, str)) <= _INLINE_CHARS:
            return self.embedder.tokenize_inputs(inputs, **kwargs)
        return await asyncio.to_thread(self.embedder.tokenize_inputs, inputs, **kwargs)

    async def run(self, items: Sequence[Tokenized], output: str, *, priority: int = 0,
                  timings: Timings | None = None) -> list[np.ndarray]:
        """Each input's row of ``output``, in order; equal to running it alone."""
        if not self.alive:
            raise NotReadyError("the inference worker is not running")
        loop = asyncio.get_running_loop()
        job = _Job(items, output, loop, loop.create_future(), time.perf_counter(),
                   results=[None] * len(items), remaining=len(items))
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

    async def embed(self, inputs: Inputs, *, dimensions: int | None = None, normalize: bool | None = None,
                    priority: int = 0, timings: Timings | None = None, max_tokens: int | None = None,
                    **tokenize) -> tuple[np.ndarray, int]:
        """(vectors (n, d) float32, prompt tokens) like ``Embedder.embed`` for these inputs alone.

        ``max_tokens`` bounds the request's total tokens (RequestError past it).
        """
        plan = self.embedder.plan_output(dimensions, normalize)
        chunked = self.embedder.chunk_plan(plan)  # what inputs longer than the window use (chunked mode)
        rows, flat, spans, total = await self._rows(inputs, plan.output, priority, timings, max_tokens, tokenize,
                                                    chunk_output=chunked.output)
        return self.embedder.finish(np.stack(pool_chunks(rows, flat, spans)), plan if spans is None else chunked), total

    async def embed_images(self, images, *, dimensions: int | None = None, normalize: bool | None = None,
                           priority: int = 0, timings: Timings | None = None) -> tuple[np.ndarray, list[Pixels]]:
        """(vectors (n, d) float32, the decoded images) like ``Embedder.embed_images``: decoded and preprocessed
        off the event loop (the embedder's bounded pool), then batched with everyone else's images."""
        plan = self.embedder.plan_output(dimensions, normalize, image=True)
        sources = as_image_list(images)
        with self.admit(len(sources)):
            started = time.perf_counter()
            items = await asyncio.to_thread(self.embedder.load_images, sources)
            if timings is not None:
                timings.tokenize = time.perf_counter() - started
            rows = await self.run(items, plan.output, priority=priority, timings=timings)
        return self.embedder.finish(np.stack(rows), plan), items

    async def embed_mixed(self, inputs: list, *, dimensions: int | None = None, normalize: bool | None = None,
                          priority: int = 0, timings: Timings | None = None, max_tokens: int | None = None,
                          **tokenize) -> tuple[np.ndarray, int, list[Pixels]]:
        """(vectors in input order, tokens, the decoded images) for a list of texts and ``ImageRef`` images
        (two-tower artifacts): each kind through its own tower, concurrently; an image counts the positions its
        tower reads as tokens."""
        at, texts = split_modalities(inputs, lambda x: isinstance(x, ImageRef))  # a text is a text, whatever it says
        if not at:
            vectors, tokens = await self.embed(inputs, dimensions=dimensions, normalize=normalize, priority=priority,
                                               timings=timings, max_tokens=max_tokens, **tokenize)
            return vectors, tokens, []
        image_job = self.embed_images([inputs[i] for i in at], dimensions=dimensions, normalize=normalize,
                                      priority=priority, timings=timings)
        if texts:
            text_job = self.embed([inputs[i] for i in texts], dimensions=dimensions, normalize=normalize,
                                  priority=priority, max_tokens=max_tokens, **tokenize)
            (image_vectors, pixels), (text_vectors, tokens) = await asyncio.gather(image_job, text_job)
        else:
            (image_vectors, pixels), text_vectors, tokens = await image_job, None, 0
        vectors = interleave(len(inputs), image_vectors.shape[1], (at, image_vectors), (texts, text_vectors))
        return vectors, tokens + sum(len(p) for p in pixels), pixels

    async def score(self, queries, documents, *, use_activation: bool | None = None, priority: int = 0,
                    timings: Timings | None = None, max_tokens: int | None = None,
                    truncate_prompt_tokens: int | None = None) -> tuple[np.ndarray, int]:
        """(scores, prompt tokens) like ``Embedder.score``: pair scores of a cross-encoder, cosines otherwise."""
        left, right = score_pairs(queries, documents)
        if not self.embedder.cross_encoder:
            vectors, total = await self.embed(left + right, normalize=True, priority=priority, timings=timings,
                                              max_tokens=max_tokens, truncate_prompt_tokens=truncate_prompt_tokens)
            return cosine_scores(vectors, len(left)), total
        with self.admit(len(right)):
            started = time.perf_counter()
            items = await asyncio.to_thread(self.embedder.tokenize_pairs, left, right,
                                            truncate_prompt_tokens=truncate_prompt_tokens)
            total = sum(len(t) for t in items)
            if max_tokens is not None and total > max_tokens:
                raise RequestError(f"the request has {total} tokens; the limit is {max_tokens}", param="documents")
            if timings is not None:
                timings.tokenize = time.perf_counter() - started
            rows = await self.run(items, "logits", priority=priority, timings=timings)
        return self.embedder.pair_scores(rows, use_activation), total

    async def classify(self, inputs: Inputs, *, use_activation: bool = True, priority: int = 0,
                       timings: Timings | None = None, max_tokens: int | None = None,
                       **tokenize) -> tuple[np.ndarray, int]:
        """((n, labels) per-label scores, prompt tokens) like ``Embedder.classify``."""
        self.embedder.require("classify")
        rows, _, _, total = await self._rows(inputs, "logits", priority, timings, max_tokens, tokenize)
        logits = np.stack(rows)
        return (activate(logits, self.embedder.card.activation) if use_activation else logits), total

    async def embed_tokens(self, inputs: Inputs, *, priority: int = 0, timings: Timings | None = None,
                           max_tokens: int | None = None, **tokenize) -> tuple[list[np.ndarray], int]:
        """(per input a (tokens, hidden) array of encoder states, prompt tokens), like ``Embedder.encode``'s
        token_embed."""
        self.embedder.require("token_embed")
        rows, flat, spans, total = await self._rows(inputs, self.embedder.token_output, priority, timings, max_tokens,
                                                    tokenize)
        if spans is not None:
            raise RequestError("token embeddings of an input longer than the model's window are not supported "
                               "in chunked mode; truncate it", param="input")
        return [self.embedder.token_states(state, len(item)) for state, item in zip(rows, flat)], total

    async def embed_sparse(self, inputs: Inputs, *, priority: int = 0, timings: Timings | None = None,
                           max_tokens: int | None = None, **tokenize) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
        """(per input its (indices, weights) of non-zero vocabulary entries, prompt tokens), like
        ``Embedder.embed_sparse``."""
        self.embedder.require("embed_sparse")
        rows, flat, spans, total = await self._rows(inputs, "sparse_embedding", priority, timings, max_tokens, tokenize)
        return [sparse_entries(row) for row in pool_sparse(rows, spans)], total

    async def _rows(self, inputs: Inputs, output: str, priority: int, timings: Timings | None, max_tokens: int | None,
                    tokenize: dict, chunk_output: str | None = None):
        """Admit, tokenize (off the loop when big), bound the tokens, queue: (rows, flat items, chunk spans, total).
        ``chunk_output``: the output to run instead when some input came back in chunks."""
        with self.admit(count_inputs(inputs)):
            started = time.perf_counter()
            items = await self.tokenize(inputs, **tokenize)
            total = sum(len(t) for t in items)
            if max_tokens is not None and total > max_tokens:
                raise RequestError(f"the request has {total} tokens; the limit is {max_tokens}", param="input")
            if timings is not None:
                timings.tokenize = time.perf_counter() - started
            flat, spans = expand_chunks(items)
            if spans is not None and chunk_output is not None:
                output = chunk_output
            rows = await self.run(flat, output, priority=priority, timings=timings)
        return rows, flat, spans, total

    # ---------------------------------------------------------------- worker
    def _take(self) -> list[tuple[int, _Job]]:
        """Pop queued inputs by priority until the padded-token budget is spent."""
        options = self.embedder.options
        taken: list[tuple[int, _Job]] = []
        longest = 0
        while self._heap and len(taken) < options.max_batch_size * 4:
            _, _, index, job = self._heap[0]
            if job.failed:
                heapq.heappop(self._heap)
                continue
            length = len(job.items[index])
            if taken and (len(taken) + 1) * max(longest, length) > options.max_batch_tokens * 4:
                break
            heapq.heappop(self._heap)
            longest = max(longest, length)
            taken.append((index, job))
        return taken

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                taken = self._take()
            if taken:
                self._process(taken)

    def _process(self, taken: list[tuple[int, _Job]]) -> None:
        now = time.perf_counter()
        for _, job in taken:
            if not job.started:
                job.started = now
        by_output: dict[str, list[tuple[int, _Job]]] = {}
        for entry in taken:
            by_output.setdefault(entry[1].output, []).append(entry)
        options = self.embedder.options
        for output, entries in by_output.items():
            lengths = [len(job.items[i]) for i, job in entries]
            for batch in plan_batches(lengths, max_batch_tokens=options.max_batch_tokens,
                                      max_batch_size=options.max_batch_size):
                chosen = [entries[b] for b in batch]
                started = time.perf_counter()
                try:
                    (out,) = self.embedder.run_batch([job.items[i] for i, job in chosen], [output])
                except ToolkitError as exc:
                    self.last_error = exc.message
                    self._fail({id(job): job for _, job in chosen}.values(), exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - never let the worker die
                    self.last_error = str(exc)
                    self._fail({id(job): job for _, job in chosen}.values(), BackendError(f"inference failed: {exc}"))
                    continue
                seconds = time.perf_counter() - started
                self.last_error = None
                if self._on_batch is not None:
                    self._on_batch(BatchStats(len(chosen), len(chosen) * max(lengths[b] for b in batch), seconds))
                for job in {id(job): job for _, job in chosen}.values():
                    job.inference += seconds
                for row, (index, job) in enumerate(chosen):
                    if job.failed:
                        continue
                    job.results[index] = out[row].copy()
                    job.remaining -= 1
                    if job.remaining == 0:
                        job.loop.call_soon_threadsafe(_resolve, job.future, job.results)

    @staticmethod
    def _fail(jobs, exc: Exception) -> None:
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
