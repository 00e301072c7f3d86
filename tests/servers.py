"""Real Prometheus and Alertmanager servers for tests, and a local webhook receiver.

`scripts/provision.sh` installs the binaries (`make test` and `.ci/run` call it: the Debian packages
`prometheus` and `prometheus-alertmanager` as root, else it says what is missing). `binary()` finds
each under any of its names (`BINARIES`); a test that needs a missing one is skipped with a reason
naming it and how to install it (pytest's summary counts them), or fails when
REQUIRE_SERVER_BINARIES=1 (CI).
Every server binds 127.0.0.1 on a free port, has its own config and data directories, and is
terminated in teardown.

    from servers import alertmanager, prometheus_factory, webhook  # noqa: F401  (fixtures)

    def test_x(webhook, alertmanager, prometheus_factory):
        prom = prometheus_factory({"scrape_configs": [...]}, rules={"alerts.yml": text})
        prom.query("up")                              # the vector of an instant query
        webhook.wait_for(lambda bodies: ...)          # POSTed JSON bodies, as Alertmanager delivers them

Fixtures: `webhook` and `alertmanager` (module scope; the Alertmanager routes everything to the
webhook receiver, group_wait/group_interval 1 s), `prometheus_factory` (module scope: starts
servers from a config dict, stops them all at the end). Without fixtures: `start_prometheus`,
`start_alertmanager` (context managers), `WebhookReceiver`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

INSTALL = "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager"
READY_TIMEOUT = 30.0
# The names each binary goes by, the Debian package's first: Debian installs Alertmanager as
# prometheus-alertmanager, the upstream archives (and other package managers) as alertmanager.
BINARIES = {"prometheus": ("prometheus",), "promtool": ("promtool",),
            "alertmanager": ("prometheus-alertmanager", "alertmanager")}
REQUIRE_ENV = "REQUIRE_SERVER_BINARIES"  # "1" (.ci/run): a missing binary fails the test, never skips it
NOT_FOUND = " not found on PATH (as "  # in the skip reason; conftest counts those skips in the summary


def _names(name: str) -> tuple[str, ...]:
    return next((v for k, v in BINARIES.items() if name == k or name in v), (name,))


def find_binary(name: str) -> str | None:
    """Path of a server binary under any of its names (`name` is a key of BINARIES or one of its names)."""
    return next((p for p in map(shutil.which, _names(name)) if p), None)


def binary(name: str) -> str:
    """Path of a server binary; skips the test, naming the binary and how to install it, when it is
    not installed (fails instead when REQUIRE_SERVER_BINARIES=1)."""
    path = find_binary(name)
    if path is None:
        reason = (f"{name}{NOT_FOUND}{' or '.join(_names(name))}); install it with `sudo scripts/provision.sh` "
                  f"(Debian: {INSTALL}; elsewhere the release archives of https://prometheus.io/download/)")
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_ENV}=1, so the test fails instead of skipping", pytrace=False)
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll until predicate() is truthy (its value is returned); AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class Server:
    """A server process on 127.0.0.1:port with its own directory; `stop()` always terminates it."""

    def __init__(self, name: str, argv: list[str], port: int, workdir: Path) -> None:
        self.name, self.port, self.workdir = name, port, workdir
        self.url = f"http://127.0.0.1:{port}"
        self.address = f"127.0.0.1:{port}"
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)

    def log(self, tail: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if http_get(f"{self.url}/-/ready", timeout=1)[0] == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready on {self.url} after {timeout:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


S = TypeVar("S", bound=Server)


def _start(cls: type[S], name: str, make_argv: Callable[[int], list[str]], workdir: Path, tries: int = 3) -> S:
    """Start on a free port and wait for /-/ready; another port when the one picked was taken meanwhile."""
    for attempt in range(tries):
        port = free_port()
        server = cls(name, make_argv(port), port, workdir)
        try:
            server.wait_ready()
            return server
        except RuntimeError:
            server.stop()
            if attempt == tries - 1 or "address already in use" not in server.log():
                raise
    raise AssertionError("unreachable")


class Prometheus(Server):
    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>: the `data` of a successful answer (AssertionError with Prometheus's error otherwise)."""
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        status, body = http_get(url, timeout=10)
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: HTTP {status}: {answer.get('error', body[:300])}")
        return answer["data"]

    def query(self, expr: str, **params: str) -> list[dict[str, Any]]:
        """An instant query's result as a list of {metric, value} (a scalar becomes one unlabelled element)."""
        data = self.api("query", query=expr, **params)
        result = data["result"]
        return result if data["resultType"] == "vector" else [{"metric": {}, "value": result}]

    def reload(self) -> None:
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        urllib.request.urlopen(req, timeout=10).read()


@contextlib.contextmanager
def start_prometheus(config: dict[str, Any], rules: dict[str, str] | None = None,
                     workdir: Path | None = None) -> Iterator[Prometheus]:
    """A real Prometheus with `config` (prometheus.yml as a dict) and rule files {name: text} beside it."""
    exe = binary("prometheus")
    with contextlib.ExitStack() as stack:
        wd = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="prometheus-")))
        wd.mkdir(parents=True, exist_ok=True)
        for name, text in (rules or {}).items():
            (wd / name).write_text(text)
        (wd / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))

        def argv(port: int) -> list[str]:
            return [exe, f"--config.file={wd / 'prometheus.yml'}", f"--storage.tsdb.path={wd / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle", "--log.level=warn"]

        server = _start(Prometheus, "prometheus", argv, wd)
        try:
            yield server
        finally:
            server.stop()


class Alertmanager(Server):
    def alerts(self) -> list[dict[str, Any]]:
        """The alerts Alertmanager holds now (API v2)."""
        return json.loads(http_get(f"{self.url}/api/v2/alerts")[1])


def webhook_route_config(url: str, group_wait: str = "1s", group_interval: str = "1s",
                         repeat_interval: str = "1h") -> dict[str, Any]:
    """An Alertmanager config sending every alert to one webhook, with short waits for tests."""
    return {
        "route": {"receiver": "webhook", "group_by": ["alertname", "run", "rank"], "group_wait": group_wait,
                  "group_interval": group_interval, "repeat_interval": repeat_interval},
        "receivers": [{"name": "webhook", "webhook_configs": [{"url": url, "send_resolved": True}]}],
    }


@contextlib.contextmanager
def start_alertmanager(config: dict[str, Any], workdir: Path | None = None) -> Iterator[Alertmanager]:
    """A real Alertmanager (clustering off) with `config` (alertmanager.yml as a dict)."""
    exe = binary("alertmanager")
    with contextlib.ExitStack() as stack:
        wd = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="alertmanager-")))
        wd.mkdir(parents=True, exist_ok=True)
        (wd / "alertmanager.yml").write_text(yaml.safe_dump(config, sort_keys=False))

        def argv(port: int) -> list[str]:
            return [exe, f"--config.file={wd / 'alertmanager.yml'}", f"--storage.path={wd / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn"]

        server = _start(Alertmanager, "alertmanager", argv, wd)
        try:
            yield server
        finally:
            server.stop()


class WebhookReceiver:
    """http.server on 127.0.0.1 in a thread, recording every POSTed JSON body (answers 200)."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []  # {"path": ..., "body": parsed JSON (or the raw text)}
        self.fail_next = 0  # answer this many POSTs with 503 first (retry tests)
        self.attempts = 0
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._cond:
                    receiver.attempts += 1
                    failing = receiver.fail_next > 0
                    receiver.fail_next -= failing
                if failing:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                with receiver._cond:
                    receiver.posts.append({"path": self.path, "body": body})
                    receiver._cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()

    def bodies(self) -> list[Any]:
        with self._cond:
            return [p["body"] for p in self.posts]

    def wait_for(self, predicate: Callable[[list[Any]], Any], timeout: float = 30.0) -> Any:
        """Wait until predicate(bodies) is truthy and return its value (AssertionError on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate([p["body"] for p in self.posts])
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"webhook: condition not met after {timeout:.0f} s; "
                                         f"received {len(self.posts)} POST(s): {json.dumps(self.posts)[:2000]}")
                self._cond.wait(left)

    def clear(self) -> None:
        with self._cond:
            self.posts.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def alerts_in(bodies: list[Any]) -> list[dict[str, Any]]:
    """Every alert in Alertmanager webhook payloads (each body has `alerts`)."""
    return [a for b in bodies if isinstance(b, dict) for a in b.get("alerts", [])]


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture(scope="module")
def alertmanager(webhook: WebhookReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alertmanager]:
    with start_alertmanager(webhook_route_config(webhook.url), tmp_path_factory.mktemp("alertmanager")) as am:
        yield am


@pytest.fixture(scope="module")
def prometheus_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Prometheus]]:
    """start(config, rules=None) -> a running Prometheus; all of them are stopped when the module ends."""
    with contextlib.ExitStack() as stack:
        def start(config: dict[str, Any], rules: dict[str, str] | None = None) -> Prometheus:
            return stack.enter_context(start_prometheus(config, rules, tmp_path_factory.mktemp("prometheus")))

        yield start


class ScriptedEndpoint:
    """A raw TCP server on 127.0.0.1 that answers connection i with `script[i]`, then with "ok":

    - "garbage": bytes that are not HTTP (the client raises http.client.BadStatusLine),
    - "close": closes without a word, as a handler that raised does (RemoteDisconnected),
    - "reset": aborts the connection (RST: ConnectionResetError or RemoteDisconnected),
    - "hang": says nothing until `release()`, then answers "ok",
    - "ok": HTTP/1.1 200 with an empty body.

    Every request read is kept in `requests` ({"action", "method", "path", "headers" (lower-case
    names), "body"}); `wait_requests(n)` waits for n of them. Use as a context manager.
    """

    def __init__(self, script: list[str] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._released = threading.Event()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self._serve, name="scripted-endpoint", daemon=True)
        self._thread.start()

    def __enter__(self) -> ScriptedEndpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def release(self) -> None:
        self._released.set()

    def wait_requests(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"scripted endpoint: {len(self.requests)} of {n} request(s) after "
                                         f"{timeout:.0f} s: {self.requests}")
                self._cond.wait(left)
            return list(self.requests)

    def close(self) -> None:
        self._released.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=5)

    @staticmethod
    def _read_request(conn: socket.socket) -> dict[str, Any]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path = (lines[0].split(" ") + ["", ""])[:2]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length") or 0):
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return {"method": method, "path": path, "headers": headers, "body": body}

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            with conn:
                conn.settimeout(10)
                try:
                    request = self._read_request(conn)
                except OSError:
                    continue
                with self._cond:
                    action = self.script.pop(0) if self.script else "ok"
                    self.requests.append({"action": action, **request})
                    self._cond.notify_all()
                with contextlib.suppress(OSError):
                    if action == "garbage":
                        conn.sendall(b"\x00\xffthis is not HTTP at all\r\n\r\n")
                    elif action == "reset":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    elif action in ("hang", "ok"):
                        if action == "hang":
                            self._released.wait(30)
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
