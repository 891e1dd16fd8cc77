"""Run a generator in a background thread, a bounded number of items ahead of its consumer.

Lets decoding and face detection of the next frames proceed while the model scores the current
crops (PyAV and torch release the GIL). The queue bound keeps memory flat however long the video.
"""
from __future__ import annotations

import contextvars
import queue
import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(items: Iterator[T], depth: int = 2, name: str = "prefetch",
             abort: Callable[[BaseException], None] | None = None) -> Iterator[T]:
    """Yield `items` as produced by a daemon thread; its exceptions re-raise here, in order.

    `abort` is called with what stopped the consumer from outside (RQ's job time limit, raised by
    SIGALRM here, on the main thread), before the producer is waited for: it can make the producer's
    source fail its next read instead of reading on (worker.s3.S3RangeReader.cancel)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_Raised(exc))
            return
        put(_DONE)

    # In the caller's context: its log lines carry the job's id, bound there (structlog contextvars).
    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    except (Exception, GeneratorExit):  # the producer's own errors, or the consumer stopping early
        raise
    except BaseException as exc:
        if abort is not None:
            abort(exc)
        raise
    finally:
        stop.set()  # the consumer stopped early: let the producer exit
        thread.join()  # it finishes its current item (bounded by the decode deadline) before the reader closes
