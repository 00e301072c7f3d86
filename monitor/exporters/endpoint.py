"""The /metrics endpoint: prometheus_client's WSGI app on a threading server, optionally over TLS
(certificate and key; client certificates required with a client CA) and behind HTTP basic auth.

`serve` starts it on a port (the next free one on conflict); `metrics_endpoint` binds `metrics.host`
and advertises `metrics.advertise` (what another host reaches), and returns no server, with one
warning, when none can be started: the run goes on without, never on a plain-HTTP endpoint in place of
a protected one.
"""

from __future__ import annotations

import base64
import binascii
import copy
import errno
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from monitor.schema import Endpoint

if TYPE_CHECKING:
    from monitor.config import MetricsConfig

log = logging.getLogger("trainmon")

PBKDF2_ITERATIONS = 200_000  # hash_password's cost: ~0.1 s once per process (a verified header is remembered)


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A `metrics.basic_auth_password_hash` for `password`: pbkdf2_sha256$<iterations>$<salt>$<hash>
    (Django's format), so that the config holds no password.

        python -c 'import getpass, monitor.exporters.prometheus as p; print(p.hash_password(getpass.getpass()))'
    """
    salt = secrets.token_urlsafe(12)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(digest).decode()}"


def parse_password_hash(hashed: str) -> tuple[str, Any]:
    """("pbkdf2_sha256", (iterations, salt, digest)) or ("bcrypt", hash bytes): ValueError for another
    format, and for a bcrypt hash without the bcrypt package."""
    if hashed.startswith("pbkdf2_sha256$"):
        try:
            _, iterations, salt, want = hashed.split("$")
            parsed = (int(iterations), salt, base64.b64decode(want, validate=True))
        except (ValueError, binascii.Error):
            raise ValueError("a pbkdf2_sha256 hash is pbkdf2_sha256$<iterations>$<salt>$<base64 hash>") from None
        if parsed[0] < 1 or not parsed[2]:
            raise ValueError("a pbkdf2_sha256 hash needs iterations >= 1 and a digest")
        return "pbkdf2_sha256", parsed
    if hashed.startswith(("$2a$", "$2b$", "$2y$")):
        try:
            import bcrypt  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            raise ValueError("a bcrypt hash needs the bcrypt package (pip install bcrypt); or use "
                             "monitor.exporters.prometheus.hash_password's pbkdf2_sha256 format") from None
        return "bcrypt", hashed.encode()
    raise ValueError("unknown format: pbkdf2_sha256$... (monitor.exporters.prometheus.hash_password) or "
                     "bcrypt $2b$...")


def check_password_hash(password: str, hashed: str) -> bool:
    """`password` against a hash parse_password_hash reads (ValueError for one it does not)."""
    kind, parsed = parse_password_hash(hashed)
    if kind == "bcrypt":
        import bcrypt  # type: ignore[import-not-found]

        return bool(bcrypt.checkpw(password.encode(), parsed))
    iterations, salt, expected = parsed
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations), expected)


class BasicAuth:
    """HTTP basic auth: one user, a password or its hash. A header that passed once is remembered (its
    SHA-256), so a slow hash costs once per process, not per scrape."""

    def __init__(self, user: str, password: str | None = None, password_hash: str | None = None) -> None:
        if (password is None) == (password_hash is None):
            raise ValueError("basic auth needs a password or a password hash (one of them)")
        self.user, self._password, self._hash = user, password, password_hash
        self._accepted: bytes | None = None
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        if not header or not header[:6].lower() == "basic ":
            return False
        seen = hashlib.sha256(header.encode("latin-1", "replace")).digest()
        with self._lock:
            if self._accepted is not None and hmac.compare_digest(seen, self._accepted):
                return True
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return False
        ok = bool(sep) and hmac.compare_digest(user.encode(), self.user.encode())
        if self._password is not None:
            ok = hmac.compare_digest(password.encode(), self._password.encode()) and ok
        elif ok:
            try:
                ok = check_password_hash(password, self._hash or "")
            except ValueError:
                ok = False
        if ok:
            with self._lock:
                self._accepted = seen
        return ok

    def wrap(self, app: Callable) -> Callable:
        """The WSGI app behind the check: 401 with a Basic challenge without the right credentials."""
        def guarded(environ: dict[str, Any], start_response: Callable) -> list[bytes]:
            if self.check(environ.get("HTTP_AUTHORIZATION")):
                return app(environ, start_response)
            body = b"401 Unauthorized: the trainmon metrics endpoint needs basic auth\n"
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="trainmon", charset="UTF-8"'),
                                                ("Content-Type", "text/plain; charset=utf-8"),
                                                ("Content-Length", str(len(body)))])
            return [body]

        return guarded


def _utf8(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


class _Encodable:
    """A registry as a scrape reads it, with text UTF-8 cannot encode replaced ("?"): a lone surrogate
    from a run.json ("\\ud800") or a file name that is not UTF-8, in one label value, must not fail every
    scrape (prometheus_client encodes the whole page at once)."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Any]:
        for metric in self._registry.collect():
            clean = copy.copy(metric)
            clean.documentation = _utf8(metric.documentation)
            clean.samples = [s._replace(labels={k: _utf8(v) for k, v in s.labels.items()}) for s in metric.samples]
            yield clean

    def restricted_registry(self, names: Any) -> _Encodable:
        return _Encodable(self._registry.restricted_registry(names))


def metrics_app(registry: CollectorRegistry) -> Callable:
    """prometheus_client's WSGI app, that never fails a scrape on text it cannot encode: the page is
    made again with that text replaced (only then: a scrape pays nothing for it otherwise)."""
    app, fallback = make_wsgi_app(registry), make_wsgi_app(_Encodable(registry))

    def serve_metrics(environ: dict[str, Any], start_response: Callable) -> list[bytes]:
        try:
            return app(environ, start_response)  # (start_response is called once the page is made)
        except UnicodeEncodeError:
            return fallback(environ, start_response)

    return serve_metrics


class _QuietHandler(WSGIRequestHandler):
    timeout = 30  # seconds a connection may sit idle: a stuck client cannot hold a thread for ever

    def log_message(self, format: str, *args: Any) -> None:
        """No access log in the training process's output."""


class _Server(ThreadingWSGIServer):
    """prometheus_client's threading WSGI server; with a TLS context, the handshake happens in the
    request's own thread (under a timeout), so a client that never completes it blocks nobody."""

    ssl_context: ssl.SSLContext | None = None
    handshake_timeout = 10.0
    request_queue_size = 128  # socketserver's 5 drops the connections of a burst: each waits 1 s to retry SYN

    def get_request(self) -> tuple[Any, Any]:
        conn, addr = super().get_request()
        if self.ssl_context is not None:
            conn = self.ssl_context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(self.handshake_timeout)
            request.do_handshake()
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError, TimeoutError)):
            return  # a plain-HTTP client on the TLS port, a failed client certificate, a client that hung up
        super().handle_error(request, client_address)


def tls_context(certfile: str, keyfile: str, client_cafile: str | None = None) -> ssl.SSLContext:
    """A server context (TLS 1.2+) with the certificate chain; with `client_cafile`, clients must present
    a certificate it signed (mutual TLS). OSError naming the file that cannot be loaded."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as e:
        raise OSError(f"cannot load the metrics TLS certificate {certfile!r} with key {keyfile!r}: {e}") from e
    if client_cafile:
        try:
            ctx.load_verify_locations(cafile=client_cafile)
        except (OSError, ssl.SSLError) as e:
            raise OSError(f"cannot load the metrics client CA {client_cafile!r}: {e}") from e
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass
class MetricsServer:
    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{hostport(self.host, self.port)}/metrics"

    def close(self) -> None:
        if self._thread.is_alive():  # (in a child made with os.fork it is not: shutdown() would wait forever)
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _start(registry: CollectorRegistry, host: str, port: int, ctx: ssl.SSLContext | None,
           auth: BasicAuth | None) -> tuple[WSGIServer, threading.Thread]:
    class Server(_Server):
        pass

    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    Server.address_family, addr = infos[0][0], infos[0][4][0]
    Server.ssl_context = ctx
    app = metrics_app(registry)
    server = make_server(addr, port, auth.wrap(app) if auth else app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="trainmon-metrics", daemon=True)
    thread.start()
    return server, thread


def serve(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9740, tries: int = 50, *,
          certfile: str | None = None, keyfile: str | None = None, client_cafile: str | None = None,
          auth: BasicAuth | None = None) -> MetricsServer:
    """Start /metrics on `port`, or the next free port on conflict (port 0: any free port); over HTTPS
    with `certfile` and `keyfile` (client certificates required with `client_cafile`), behind `auth`.

    OSError when no port of the `tries` is free, `host` is no address of this machine, or the TLS
    files cannot be loaded."""
    ctx = tls_context(certfile, keyfile, client_cafile) if certfile and keyfile else None
    last: OSError | None = None
    for p in [0] if port == 0 else range(port, min(port + tries, 65536)):
        try:
            server, thread = _start(registry, host, p, ctx, auth)
        except OSError as e:
            if e.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise OSError(e.errno, f"cannot serve the metrics endpoint on {host}:{p}: {e.strerror or e}") from e
            last = e
            continue
        return MetricsServer(host, server.server_port, server, thread, "https" if ctx else "http")
    raise OSError(f"no free port for the metrics endpoint on {host} in {port}..{port + tries - 1}: {last}")


def hostport(host: str, port: int) -> str:
    """host:port, an IPv6 address in brackets ([::1]:9740), as Prometheus targets and URLs write it."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def split_hostport(value: str) -> tuple[str, int | None]:
    """("host", port or None) of host, host:port, [v6] or [v6]:port (a bare IPv6 address has no port).
    ValueError for a port that is no number in 1..65535, or no host."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            raise ValueError(f"{value!r}: expected [address] or [address]:port")
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, None
    if not host:
        raise ValueError(f"{value!r}: no host")
    if port is None:
        return host, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number in 1..65535")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _unspecified(host: str) -> bool:
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def node_name() -> str:
    """This node's fully qualified name, or its host name where the FQDN is only a loopback alias
    (a container whose /etc/hosts maps the host name to 127.0.1.1 gives "localhost")."""
    fqdn = socket.getfqdn()
    return socket.gethostname() if not fqdn or is_loopback(fqdn) else fqdn


def advertised(cfg: MetricsConfig, bound_port: int, local_rank: int) -> tuple[str, int]:
    """(host, port) that Prometheus should scrape: `metrics.advertise` (its port, when it has one, offset
    by LOCAL_RANK as the bind port is), else the bind address itself when it is loopback or one address
    of this machine, else (every interface: 0.0.0.0, ::) the node's FQDN; the bound port by default."""
    if cfg.advertise:
        host, port = split_hostport(cfg.advertise)
        return host, bound_port if port is None else port + local_rank
    host = cfg.host.strip("[]")
    return (node_name() if _unspecified(host) else host), bound_port


def basic_auth_of(cfg: MetricsConfig) -> BasicAuth | None:
    if not cfg.basic_auth_user:
        return None
    pw = cfg.basic_auth_password.get_secret_value() if cfg.basic_auth_password is not None else None
    return BasicAuth(cfg.basic_auth_user, pw, cfg.basic_auth_password_hash)


def metrics_endpoint(registry: CollectorRegistry, cfg: MetricsConfig, rank: int,
                     local_rank: int) -> tuple[MetricsServer | None, list[Endpoint]]:
    """The /metrics server (bound to `metrics.host`, port + LOCAL_RANK, with the TLS and basic auth
    configured) and its advertised endpoint; none, with one warning, when it cannot be started (every
    port of the search taken, a host that is no address of this machine, TLS files that do not load):
    the run goes on without, never on a plain-HTTP endpoint in place of a protected one."""
    try:
        server = serve(registry, cfg.host, cfg.port + local_rank if cfg.port else 0, cfg.port_search,
                       certfile=cfg.tls_cert_file, keyfile=cfg.tls_key_file, client_cafile=cfg.tls_client_ca_file,
                       auth=basic_auth_of(cfg))
    except OSError as e:
        log.warning("trainmon: no metrics endpoint for rank %d (%s); training goes on without /metrics, and "
                    "run.json and targets.json list none for this rank", rank, e)
        return None, []
    host, port = advertised(cfg, server.port, local_rank)
    url = f"{server.scheme}://{hostport(host, port)}/metrics"
    return server, [Endpoint(rank=rank, local_rank=local_rank, host=host, port=port, url=url)]
