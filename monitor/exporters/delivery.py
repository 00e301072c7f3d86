"""Reliable-enough HTTP delivery for alert sinks: a bounded queue and one worker thread.

`submit()` never blocks the caller (the rules engine): when the queue is full the payload is
dropped and counted. The worker POSTs JSON with a timeout and retries with exponential backoff
on connection errors, timeouts, replies that are not HTTP, 429 and 5xx (any exception an attempt
raises is caught and counted: the worker goes on with the next alert). URLs are secrets (Slack
puts its token in the path): they are only ever logged redacted, and exception messages, which
may quote them, are never logged. Credentials in a URL (`https://user:pass@host/...`) are sent
as HTTP basic authentication.

A receiver cannot hold the worker or its memory: `timeout` bounds a whole attempt (a reply that
trickles in a byte at a time is cut off, not only a silent one), a reply's body is never read, and
redirects are not followed (urllib would re-send the credentials to wherever the Location points
and turn the POST into a bodiless GET counted as sent): a 3xx is a failed delivery.

Each delivery (one POST, retries included) ends `sent`, `failed` or `dropped`, counted on the
`HttpDelivery` (`sent`, `failed`, `dropped`) and, given a `DeliveryMetrics`, in the Prometheus
counters `trainmon_alert_deliveries_total{sink, outcome}` and
`trainmon_alert_delivery_errors_total{sink, reason}` (every failed attempt, retried or not).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("trainmon.sinks")

_STOP = object()
OUTCOMES = ("sent", "failed", "dropped")
# Why an attempt failed (the `reason` label): a bounded set.
REASONS = ("http_status", "timeout", "connection", "protocol", "other")


def redact(url: str) -> str:
    """scheme://host[:port]/*** : never the path, query or credentials."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}/***"
    except ValueError:
        return "<invalid url>"


class DeliveryMetrics:
    """The delivery counters of one registry, shared by its HTTP sinks (told apart by `sink`).

    Process-wide series without `run`/`rank`: one sink carries the alerts of every run the
    process (or the daemon) holds. Get them with `delivery_metrics(registry)`, which registers
    the families once per registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "trainmon_alert_deliveries", "Alert deliveries (one POST each, retries included) by HTTP sink and outcome: "
            "sent, failed (retries spent or not retryable), dropped (queue full, or still queued at close).",
            ["sink", "outcome"], registry=registry)
        self.errors = Counter(
            "trainmon_alert_delivery_errors", "Failed alert delivery attempts (retried or not) by HTTP sink and reason: "
            "http_status, timeout, connection, protocol (a reply that is not HTTP), other.",
            ["sink", "reason"], registry=registry)

    def sink(self, name: str) -> tuple[dict[str, Any], Callable[[str], Any]]:
        """The outcome children of sink `name` (created now: 0 from the first scrape) and its errors' lookup."""
        return ({o: self.deliveries.labels(name, o) for o in OUTCOMES},
                lambda reason: self.errors.labels(name, reason))


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, DeliveryMetrics] = weakref.WeakKeyDictionary()
_METRICS_LOCK = threading.Lock()


def delivery_metrics(registry: CollectorRegistry | None) -> DeliveryMetrics | None:
    """The delivery counters registered in `registry` (once per registry); None without one."""
    if registry is None:
        return None
    with _METRICS_LOCK:
        m = _METRICS.get(registry)
        if m is None:
            m = _METRICS[registry] = DeliveryMetrics(registry)
        return m


def _request_parts(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its credentials, and the headers (basic authentication for the credentials)."""
    headers = {"Content-Type": "application/json"}
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, headers
    user_pass = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    headers["Authorization"] = "Basic " + base64.b64encode(user_pass.encode("utf-8")).decode("ascii")
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])), headers


class _Deadline:
    """Bounds one attempt in time: its socket is shut down when `seconds` have passed. The socket
    timeout alone bounds each read, not a reply that trickles in a byte at a time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self._timer is None:
                self._timer = threading.Timer(self.seconds, self._expire)
                self._timer.daemon = True
                self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns: the attempt fails
                except OSError:
                    pass

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._sock = None


class _Watched:
    """An HTTP(S) handler whose connections put their socket under the current attempt's `_Deadline`."""

    deadline: _Deadline | None = None

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        handler = self

        class Connection(http_class):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                super().connect()
                if handler.deadline is not None:
                    handler.deadline.watch(self.sock)

        return super().do_open(Connection, req, **kwargs)  # type: ignore[misc]


class _WatchedHTTP(_Watched, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPS(_Watched, urllib.request.HTTPSHandler):
    pass


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib raises the 3xx as an HTTPError: not followed, a failed delivery


def _failure(e: BaseException) -> tuple[str, str]:
    """(reason label, words for the log) of a failed attempt. Never the exception's message: it may
    quote the URL (InvalidURL, ValueError); an OSError's strerror comes from the OS."""
    inner = e.reason if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException) else e
    name = type(inner).__name__
    if isinstance(inner, http.client.HTTPException):  # before OSError: RemoteDisconnected is both
        reason = "protocol"
    elif isinstance(inner, TimeoutError):
        reason = "timeout"
    elif isinstance(inner, OSError):
        reason = "connection"
    else:
        reason = "other"
    strerror = getattr(inner, "strerror", None)
    return reason, f"{name}: {strerror}" if isinstance(strerror, str) and strerror else name


class HttpDelivery:
    def __init__(self, name: str, *, timeout: float = 5.0, retries: int = 3, backoff: float = 1.0,
                 queue_size: int = 256, on_idle: Callable[[], None] | None = None, idle_seconds: float = 1.0,
                 metrics: DeliveryMetrics | None = None) -> None:
        self.name = name
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.sent = self.failed = self.dropped = 0
        self._outcomes, self._errors = metrics.sink(name) if metrics is not None else ({}, None)
        self._count_lock = threading.Lock()
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._on_idle = on_idle
        self._idle_seconds = idle_seconds
        self._reported: set[str] = set()
        self._stop = threading.Event()
        self._handlers = (_WatchedHTTP(), _WatchedHTTPS())  # the worker's only: one attempt at a time
        self._opener = urllib.request.build_opener(*self._handlers, _NoRedirect())
        self._thread = threading.Thread(target=self._run, name=f"trainmon-{name}", daemon=True)
        self._thread.start()

    def submit(self, url: str, payload: Any) -> bool:
        if self._stop.is_set():
            self._count("dropped")
            self._warn_once("closed", f"{self.name}: alert submitted after close, dropped (counted)")
            return False
        try:
            self._q.put_nowait((url, payload))
            return True
        except queue.Full:
            self._count("dropped")
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
        left = 0  # what the worker will never send now: counted as dropped, said once
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                left += 1
                self._count("dropped")
            self._q.task_done()
        if left:
            log.warning("trainmon: %s: %d alert(s) still queued at close, dropped (counted)", self.name, left)

    def _count(self, outcome: str) -> None:
        with self._count_lock:  # submit() (the engine's thread) and the worker both count
            setattr(self, outcome, getattr(self, outcome) + 1)
        child = self._outcomes.get(outcome)
        if child is not None:
            child.inc()

    def _error(self, reason: str) -> None:
        if self._errors is not None:
            self._errors(reason).inc()

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
                        self._warn_once("idle", f"{self.name}: {type(e).__name__} in the periodic re-send")
                continue
            try:
                if item is _STOP:
                    return
                self._deliver(*item)
            except Exception as e:  # not what an endpoint did (those are caught per attempt): still never fatal
                self._count("failed")
                self._error("other")
                self._warn_once(f"bug {type(e).__name__}", f"{self.name}: delivery to {redact(item[0])} failed "
                                                         f"({type(e).__name__}); counted, the next alerts go on")
            finally:
                self._q.task_done()

    def _deliver(self, url: str, payload: Any) -> None:
        body = json.dumps(payload).encode("utf-8")
        target, headers = _request_parts(url)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            deadline = _Deadline(self.timeout)
            for h in self._handlers:
                h.deadline = deadline
            try:
                req = urllib.request.Request(target, data=body, method="POST", headers=headers)
                with self._opener.open(req, timeout=self.timeout):
                    pass  # the status is the answer: the body is never read (a huge or endless one costs nothing)
                if deadline.expired:  # headers cut off at the deadline may still parse as a whole reply
                    raise TimeoutError
                self._count("sent")
                return
            except urllib.error.HTTPError as e:
                e.close()
                self._error("http_status")
                if e.code != 429 and e.code < 500:
                    self._count("failed")
                    moved = " (a redirect: not followed; configure the URL it points to)" if 300 <= e.code < 400 else ""
                    self._warn_once(f"http {e.code}", f"{self.name}: {redact(url)} answered {e.code}{moved}; "
                                                      "not retried")
                    return
                why = f"HTTP {e.code}"
            except Exception as e:  # connection errors, timeouts, a reply that is not HTTP, anything else
                reason, why = ("timeout", "TimeoutError: no complete reply within the timeout") if deadline.expired \
                    else _failure(e)
                self._error(reason)
            finally:
                deadline.cancel()
            if attempt < self.retries and not self._stop.wait(delay):
                delay *= 2
                continue
            self._count("failed")
            self._warn_once(f"fail {why}", f"{self.name}: delivery to {redact(url)} failed after "
                                           f"{attempt + 1} attempt(s) ({why}); counted, further failures quiet")
            return
