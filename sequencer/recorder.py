"""Recording opens and clicks: a background writer that stores them in batches.

Opens and clicks arrive fast and in bursts, so the HTTP endpoints only put
them on a queue; a thread takes them off in batches and writes each batch in
one transaction (``ingest.write_events``). A graceful stop (``stop_writer``)
writes everything still queued: no event is lost.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time

from sequencer.db import get_engine
from sequencer.ingest import PendingEvent, write_events

__all__ = [
    "EventWriter",
    "PendingEvent",
    "events_written",
    "flush_writer",
    "start_writer",
    "stop_writer",
    "submit",
]

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25
"""How long an event may wait in memory before it is written."""

BATCH_SIZE = 2000
"""Events written in one transaction at most."""


# --- The background writer ------------------------------------------------------


class EventWriter:
    """A thread that writes queued events in batches.

    Endpoints call ``submit``, which never touches the database, so a slow or
    busy database does not slow the pixel down; it only delays the numbers.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[PendingEvent | threading.Event] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self.written = 0
        """Events written since the process started (for the benchmark)."""

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, event: PendingEvent) -> None:
        """Queue one event; starts the writer if no lifespan did."""
        self._queue.put(event)
        if self._thread is None:
            self.start()

    def start(self) -> None:
        """Start the thread; calling it again while it runs does nothing."""
        with self._lock:
            if self.running:
                return
            self._stopping.clear()
            self._wake.clear()
            self._thread = threading.Thread(
                target=self._run, name="tracking-writer", daemon=True
            )
            self._thread.start()
        logger.info("tracking event writer started")

    def stop(self, timeout: float = 60.0) -> None:
        """Write every queued event, then end the thread.

        Events submitted while it stops are written here, by the caller, so a
        request answered during shutdown is not lost either.
        """
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._stopping.set()
            self._wake.set()
        thread.join(timeout)
        if thread.is_alive():
            logger.error("tracking writer did not finish within %ss", timeout)
            return
        with self._lock:
            self._thread = None
            late, markers = self._drain()
        if late:
            self._write_with_retry(late)
        for marker in markers:
            marker.set()
        logger.info("tracking event writer stopped; %s events written", self.written)

    def _drain(self) -> tuple[list[PendingEvent], list[threading.Event]]:
        """Everything left on the queue, without waiting."""
        events: list[PendingEvent] = []
        markers: list[threading.Event] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return events, markers
            if isinstance(item, threading.Event):
                markers.append(item)
            else:
                events.append(item)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every event submitted so far is written."""
        if self._thread is None:
            return self._queue.empty()
        done = threading.Event()
        self._queue.put(done)
        self._wake.set()
        return done.wait(timeout)

    def _run(self) -> None:
        """Sleep, then write what came meanwhile, until told to stop.

        The thread sleeps between batches instead of waiting on the queue, so
        a request putting an event there never wakes it: under load, the
        endpoints and the writer do not take turns at every event.
        """
        while True:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            stopping = self._stopping.is_set()
            while True:
                batch, markers = self._take()
                if batch:
                    self._write_with_retry(batch)
                for marker in markers:
                    marker.set()
                if not batch and not markers:
                    break
            if stopping:
                return

    def _take(self) -> tuple[list[PendingEvent], list[threading.Event]]:
        """What is queued, up to a batch, or up to a flush marker."""
        batch: list[PendingEvent] = []
        markers: list[threading.Event] = []
        while len(batch) < BATCH_SIZE:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, threading.Event):
                markers.append(item)
                break
            batch.append(item)
        return batch, markers

    def _write_with_retry(self, batch: list[PendingEvent]) -> None:
        """Write a batch, retrying while the database is unavailable.

        While stopping, gives up after a few attempts and says how many
        events are lost, rather than hang the shutdown forever.
        """
        delay = 0.5
        attempt = 0
        while True:
            attempt += 1
            try:
                self.written += write_events(get_engine(), batch)
                return
            except Exception:
                logger.exception(
                    "could not write %s tracking events (attempt %s)",
                    len(batch),
                    attempt,
                )
                if self._stopping.is_set() and attempt >= 5:
                    logger.error("%s tracking events lost at shutdown", len(batch))
                    return
                time.sleep(delay)
                delay = min(delay * 2, 10.0)


_writer = EventWriter()


def start_writer() -> EventWriter:
    """Start this process's event writer (idempotent); the lifespan calls it."""
    _writer.start()
    return _writer


def stop_writer() -> None:
    """Write what is queued and stop the writer; the lifespan exit calls it."""
    _writer.stop()


def flush_writer(timeout: float = 30.0) -> bool:
    """Block until every event taken so far is in the database."""
    return _writer.flush(timeout)


def submit(event: PendingEvent) -> None:
    """Queue an event for the writer."""
    _writer.submit(event)


def events_written() -> int:
    """How many events this process's writer has stored."""
    return _writer.written


atexit.register(stop_writer)
