"""Reliable-enough HTTP delivery for alert sinks: a bounded queue and one worker thread.

`submit()` never blocks the caller (the rules engine): when the queue is full the payload is
dropped and counted. The worker POSTs JSON with a timeout and retries with exponential backoff
on connection errors, 429 and 5xx. URLs are secrets (Slack puts its token in the path): they are
only ever logged redacted.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("trainmon.sinks")

_STOP = object()


def redact(url: str) -> str:
    """scheme://host[:port]/*** : never the path, query or credentials."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}/***"
    except ValueError:
        return "<invalid url>"


class HttpDelivery:
    def __init__(self, name: str, *, timeout: float = 5.0, retries: int = 3, backoff: float = 1.0,
                 queue_size: int = 256, on_idle: Callable[[], None] | None = None, idle_seconds: float = 1.0) -> None:
        self.name = name
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.sent = self.failed = self.dropped = 0
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._on_idle = on_idle
        self._idle_seconds = idle_seconds
        self._reported: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"trainmon-{name}", daemon=True)
        self._thread.start()

    def submit(self, url: str, payload: Any) -> bool:
        try:
            self._q.put_nowait((url, payload))
            return True
        except queue.Full:
            self.dropped += 1
            self._warn_once("queue full", f"{self.name}: delivery queue full, alert dropped (counted)")
            return False

    def flush(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._q.all_tasks_done:
            while self._q.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._q.all_tasks_done.wait(min(left, 0.1))
        return True

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._stop.set()
        try:
            self._q.put_nowait(_STOP)
        except queue.Full:
            pass
        self._thread.join(timeout=max(1.0, timeout))

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning("trainmon: %s", msg)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._q.get(timeout=self._idle_seconds)
            except queue.Empty:
                if self._on_idle is not None:
                    try:
                        self._on_idle()
                    except Exception as e:  # a resend that failed to build must not kill the worker
                        self._warn_once("idle", f"{self.name}: {e!r}")
                continue
            try:
                if item is _STOP:
                    return
                self._deliver(*item)
            finally:
                self._q.task_done()

    def _deliver(self, url: str, payload: Any) -> None:
        body = json.dumps(payload).encode("utf-8")
        delay = self.backoff
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    resp.read()
                self.sent += 1
                return
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    self.failed += 1
                    self._warn_once(f"http {e.code}", f"{self.name}: {redact(url)} answered {e.code}; not retried")
                    return
                why = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                why = type(getattr(e, "reason", e)).__name__
            if attempt < self.retries and not self._stop.wait(delay):
                delay *= 2
                continue
            self.failed += 1
            self._warn_once(f"fail {why}", f"{self.name}: delivery to {redact(url)} failed after "
                                           f"{attempt + 1} attempt(s) ({why}); counted, further failures quiet")
            return
