"""Dynamic batcher: requests of all tasks merged into token-budgeted, length-sorted batches, one
forward per batch on a single inference thread. The event loop never runs the model.

Life of a request (one HTTP call, any number of tasks):

1. admission, on the event loop: while the queue is full the server refuses the request before
   reading its body; then, if the sequences waiting plus this request's exceed ``max_queue``,
   Overloaded (503 + Retry-After) at once, before any work;
2. ``tasks.acquire`` pins the current version of every task once, so the whole request is
   served by those versions even if a task is replaced meanwhile (its row is not freed while
   pinned); UnknownTask here is a 404;
3. tokenization in a one-thread pool (the fast tokenizer's truncation state is not safe to share
   between threads), then its sequences join the queue;
4. the inference thread takes a window of about one forward's worth of tokens, one sequence
   from each waiting request in turn (round robin, requests in arrival order), so a request of
   256 long texts is split across many windows and a one-text request that arrives behind it
   joins the next window instead of waiting for all of it; it sorts the window by length and
   cuts it into batches of at most ``max_batch_tokens`` padded tokens (sequences x longest) and
   ``max_batch_requests`` sequences, tasks mixed freely, and on a CPU also wherever padding
   would cost more than another forward (``Engine.plan``), shortest first; one
   ``engine.forward`` per batch. A forward that fails is retried in halves down to the sequence
   that fails it, so one bad sequence fails its own request only;
5. each request's future resolves when its last sequence is done; its versions are released then
   (also if the client went away), never earlier.

A request's work is bounded: ``max_tokens_per_request`` tokens after tokenization (413 past it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from bitfit_serve.engine import Engine, Prediction
from bitfit_serve.inputs import EncodedInput, TextInput
from bitfit_serve.errors import InputTooLong, InvalidInput, NonFiniteOutput, NotReady, Overloaded, PayloadTooLarge
from bitfit_serve.metrics import Metrics
from bitfit_serve.registry import TaskVersion

log = logging.getLogger(__name__)

# A window holds at most this many batches' worth of sequences and one batch's worth of tokens:
# enough to sort lengths into well-filled batches, small enough that a request arriving now
# waits for about one forward, whatever is queued before it.
WINDOW_BATCHES = 4
# Watchdog: a forward is overdue (the worker hangs, readiness turns 503) after STALL_S plus
# STALL_FACTOR x its expected time, estimated from earlier forwards' seconds per padded token
# (prior: 1 ms/token, about MiniLM on two CPU cores). A long batch on a slow device is not a hang.
STALL_S = 1.0
STALL_FACTOR = 4.0

Group = tuple[str, Sequence[TextInput]]  # (task, inputs): one task's part of a request


@dataclass(eq=False)
class _Request:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    versions: list[TaskVersion]  # one per sequence, pinned at admission
    group_sizes: list[int]
    results: list[Prediction | None]
    remaining: int  # sequences not yet answered or dropped; touched by the worker thread only
    error: BaseException | None = None


@dataclass(frozen=True, eq=False)
class _Seq:
    request: _Request
    index: int  # position in request.results
    encoded: EncodedInput
    version: TaskVersion

    def __len__(self) -> int:
        return len(self.encoded)


@dataclass
class _State:
    # each waiting request's sequences not yet taken, requests in arrival order
    waiting: OrderedDict[_Request, deque[_Seq]] = field(default_factory=OrderedDict)
    depth: int = 0  # sequences admitted and not yet taken into a batch (including tokenizing ones)
    stopping: bool = False
    exited: bool = False
    overdue_at: float | None = None  # while a forward runs: the monotonic time it counts as hung


class Batcher:
    def __init__(self, engine: Engine, *, max_batch_tokens: int, max_batch_requests: int, max_queue: int,
                 retry_after_s: int = 1, metrics: Metrics | None = None, max_tokens_per_request: int | None = None):
        self.engine = engine
        self.max_tokens_per_request = max_tokens_per_request
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._cond = threading.Condition()
        self._state = _State()
        self._thread = threading.Thread(target=self._run, name="bitfit-inference", daemon=True)
        self._tokenizer = ThreadPoolExecutor(1, thread_name_prefix="bitfit-tokenize")
        self._s_per_token = 1e-3  # moving average over forwards, for the watchdog

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Admit nothing new, let the worker finish what is queued, then stop it."""
        with self._cond:
            self._state.stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._tokenizer.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        """The inference worker runs, is not hung in a forward, and admits work (readiness)."""
        overdue_at = self._state.overdue_at
        return (self._thread.is_alive() and not (self._state.stopping or self._state.exited)
                and (overdue_at is None or time.monotonic() < overdue_at))

    @property
    def queue_depth(self) -> int:
        return self._state.depth

    # ------------------------------------------------------------------ event-loop side
    def check_room(self, n: int = 1) -> None:
        """Raise Overloaded unless ``n`` more sequences fit in the queue. The server also calls it
        before reading a request's body, so that refusing costs next to nothing under overload."""
        depth = self._state.depth
        if depth + n > self.max_queue:
            raise Overloaded(f"the queue is full ({depth} of max_queue={self.max_queue} sequences waiting); "
                             f"retry after {self.retry_after_s} s", retry_after=self.retry_after_s)

    async def submit(self, groups: Sequence[Group], truncate: bool = True) -> list[list[Prediction]]:
        """Run every group's inputs on its task; returns the predictions per group, in order.
        ``truncate`` False: an input longer than its task's max_length fails the request (422)."""
        n = sum(len(inputs) for _, inputs in groups)
        if n == 0:
            return [[] for _ in groups]
        with self._cond:
            if self._state.stopping or self._state.exited:
                raise NotReady("the inference worker is not running")
            self.check_room(n)
            self._state.depth += n
        loop = asyncio.get_running_loop()
        request = None
        try:
            versions = self.engine.tasks.acquire(task for task, inputs in groups for _ in inputs)
            try:
                encoded = await loop.run_in_executor(self._tokenizer, self._tokenize, versions, groups, truncate)
                tokens = sum(len(e) for e in encoded)
                if self.max_tokens_per_request is not None and tokens > self.max_tokens_per_request:
                    raise PayloadTooLarge(f"the request's inputs are {tokens} tokens, over max_tokens_per_request="
                                          f"{self.max_tokens_per_request}: split it into smaller requests")
                request = _Request(loop, loop.create_future(), versions, [len(i) for _, i in groups],
                                   [None] * n, n)
                with self._cond:
                    if self._state.stopping or self._state.exited:
                        raise NotReady("the inference worker is not running")
                    self._state.waiting[request] = deque(_Seq(request, i, e, v)
                                                         for i, (e, v) in enumerate(zip(encoded, versions)))
                    self._cond.notify()
            except BaseException:
                request = None
                self.engine.tasks.release(versions)
                raise
        finally:
            if request is None:
                with self._cond:
                    self._state.depth -= n
        return await request.future

    def _tokenize(self, versions: list[TaskVersion], groups: Sequence[Group], truncate: bool) -> list[EncodedInput]:
        """One tokenizer call per group; errors name the item when the request has several."""
        encoded: list[EncodedInput] = []
        for k, (_, inputs) in enumerate(groups):
            if not inputs:
                continue
            try:
                encoded.extend(self.engine.tokenize(versions[len(encoded)], inputs, truncate=truncate))
            except (InvalidInput, InputTooLong) as e:
                raise type(e)(f"items[{k}].{e.message}" if len(groups) > 1 else e.message) from None
        return encoded

    # ------------------------------------------------------------------ inference thread
    def _run(self) -> None:
        planned: list[list[_Seq]] = []
        try:
            while True:
                window = self._take_window()
                if window is None:
                    return
                planned = self._plan(window)
                while planned:
                    self._run_batch(planned[0])
                    planned.pop(0)
        except BaseException:
            log.critical("the inference worker died; the server is no longer ready", exc_info=True)
            raise
        finally:
            # Reached on stop, or if the worker dies: nobody may wait forever on a dead worker.
            with self._cond:
                self._state.exited = True
                leftovers = [*(s for batch in planned for s in batch),
                             *(s for seqs in self._state.waiting.values() for s in seqs)]
                self._state.waiting.clear()
                self._state.depth = 0
            error = NotReady("the inference worker stopped")
            for seq in leftovers:
                self._account(seq, error=error)

    def _take_window(self) -> list[_Seq] | None:
        """One sequence from each waiting request in turn, until the window holds one batch's
        worth of tokens or WINDOW_BATCHES batches' worth of sequences (at least one sequence)."""
        with self._cond:
            waiting = self._state.waiting
            while not waiting and not self._state.stopping:
                self._cond.wait()
            if not waiting:
                return None
            window: list[_Seq] = []
            tokens, cap = 0, self.max_batch_requests * WINDOW_BATCHES
            while waiting and len(window) < cap and (not window or tokens < self.max_batch_tokens):
                for request in list(waiting):
                    seqs = waiting[request]
                    window.append(seqs.popleft())
                    tokens += len(window[-1])
                    if not seqs:
                        del waiting[request]
                    if len(window) == cap or tokens >= self.max_batch_tokens:
                        break
            self._state.depth -= len(window)
            return window

    def _plan(self, window: list[_Seq]) -> list[list[_Seq]]:
        """Drop sequences nobody waits for; cut the rest into length-sorted batches within the
        token budget and sequence cap, as padding-aware as the device calls for (``Engine.plan``)."""
        live = []
        for seq in window:
            if seq.request.future.cancelled() or seq.request.error is not None:
                self._account(seq)
            else:
                live.append(seq)
        batches = self.engine.plan([len(s) for s in live], self.max_batch_requests, self.max_batch_tokens)
        return [[live[i] for i in batch] for batch in batches]

    def _run_batch(self, batch: list[_Seq]) -> None:
        engine = self.engine
        tokens = len(batch[-1]) * len(batch)  # padded: the batch is sorted by length
        start = time.perf_counter()
        self._state.overdue_at = time.monotonic() + STALL_S + STALL_FACTOR * self._s_per_token * tokens
        try:
            logits = engine.forward(engine.collate([s.encoded for s in batch], [s.version.row for s in batch]))
        except Exception as e:  # a bug, an OOM, or one sequence the forward cannot take
            self._state.overdue_at = None
            if len(batch) > 1:  # find the culprit: the other requests of this forward are answered
                log.warning("forward failed for a batch of %d sequences (%s); retrying it in halves",
                            len(batch), e)
                half = len(batch) // 2
                self._run_batch(batch[:half])
                self._run_batch(batch[half:])
                return
            log.exception("forward failed for one sequence of task %r", batch[0].version.task)
            self._account(batch[0], error=e)
            return
        finally:
            self._state.overdue_at = None
        elapsed = time.perf_counter() - start
        self._s_per_token = 0.8 * self._s_per_token + 0.2 * elapsed / tokens
        if self.metrics is not None:
            self.metrics.forward_seconds.observe(elapsed)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batch_tokens.observe(tokens)
        for i, seq in enumerate(batch):
            try:  # one sequence's bad output fails its own request only
                prediction = engine.postprocess(seq.version, logits[i], seq.encoded)
            except NonFiniteOutput as e:
                self._account(seq, error=e)
            else:
                self._account(seq, prediction=prediction)

    def _account(self, seq: _Seq, prediction: Prediction | None = None, error: BaseException | None = None) -> None:
        """Record one sequence's outcome; the first error answers the request at once, the versions
        are released when its last sequence is accounted for."""
        request = seq.request
        if error is not None and request.error is None:
            request.error = error
            _settle(request)
        if prediction is not None:
            request.results[seq.index] = prediction
        request.remaining -= 1
        if request.remaining == 0:
            self.engine.tasks.release(request.versions)
            if request.error is None:
                _settle(request)


def _settle(request: _Request) -> None:
    """Resolve the request's future on its own event loop."""
    def settle() -> None:
        if request.future.done():  # cancelled: the client went away
            return
        if request.error is not None:
            request.future.set_exception(request.error)
            return
        out, start = [], 0
        for size in request.group_sizes:
            out.append(request.results[start:start + size])
            start += size
        request.future.set_result(out)

    try:
        request.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass
