"""Crafted bad input at the user-facing surfaces: the CLI's options and files, the /metrics endpoint, the
HTTP receivers alerts are delivered to. Each test holds what a fuzz pass found broken: a clear one-line
error (never a traceback), a scrape that never fails, a delivery no receiver can hold or redirect."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Gauge
from servers import ScriptedEndpoint
from typer.testing import CliRunner

from monitor.cli.app import app
from monitor.exporters.alertmanager import AlertmanagerSink
from monitor.exporters.delivery import HttpDelivery, delivery_metrics
from monitor.exporters.endpoint import serve
from monitor.schema import Alert, Severity

runner = CliRunner()


def _one_line_error(result, *needles: str) -> str:
    """The command failed with exit 2 and one `error:` line naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "[Errno" not in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# -- delivery: redirects, replies that never end -------------------------------------------------------


class _Receiver(ThreadingHTTPServer):
    """A receiver on 127.0.0.1 answering every POST with `reply(handler)`; what it got in `got`."""

    def __init__(self, reply) -> None:
        got: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                got.append({"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"),
                            "body": self.rfile.read(n)})
                reply(self)

        super().__init__(("127.0.0.1", 0), Handler)
        self.got = got
        self.url = f"http://127.0.0.1:{self.server_port}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def __enter__(self) -> _Receiver:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def _ok(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "0")
    h.end_headers()


def test_a_redirect_is_not_followed_so_credentials_stay_with_the_configured_host(caplog):
    caplog.set_level(logging.WARNING, logger="trainmon.sinks")
    with _Receiver(_ok) as elsewhere:
        def moved(h: BaseHTTPRequestHandler) -> None:
            h.send_response(302)
            h.send_header("Location", elsewhere.url + "/landed")
            h.send_header("Content-Length", "0")
            h.end_headers()

        with _Receiver(moved) as hook:
            delivery = HttpDelivery("webhook", retries=2, backoff=0.01)
            delivery.submit(hook.url.replace("http://", "http://bob:PWSECRET@") + "/services/TOKSECRET", {"n": 1})
            assert delivery.flush(10)
            delivery.close()
    # urllib followed it: a bodiless GET to the other host, with bob's credentials, counted as sent
    assert elsewhere.got == []
    assert [r["method"] for r in hook.got] == ["POST"] and hook.got[0]["auth"].startswith("Basic ")
    assert (delivery.sent, delivery.failed) == (0, 1)  # a 3xx is not retried: the URL is wrong
    assert "answered 302 (a redirect: not followed" in caplog.text
    assert "SECRET" not in caplog.text and "bob" not in caplog.text


def _raw_server(answer) -> tuple[socket.socket, int]:
    """A TCP server calling answer(conn) for each connection, after reading the request's head."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.recv(65536)
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_a_reply_trickling_in_a_byte_at_a_time_is_cut_off_at_the_timeout():
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                while not stop.wait(0.05):  # each byte well within the socket timeout, the headers never end
                    conn.sendall(b"X")
            except OSError:
                pass

    srv, port = _raw_server(trickle)
    registry = CollectorRegistry()
    delivery = HttpDelivery("webhook", timeout=0.5, retries=0, metrics=delivery_metrics(registry))
    try:
        start = time.monotonic()
        delivery.submit(f"http://127.0.0.1:{port}/hook", {"n": 1})
        assert delivery.flush(10), "the worker is still held by the receiver"
        assert time.monotonic() - start < 5
    finally:
        stop.set()
        delivery.close()
        srv.close()
    assert (delivery.sent, delivery.failed) == (0, 1)
    assert registry.get_sample_value("trainmon_alert_delivery_errors_total",
                                     {"sink": "webhook", "reason": "timeout"}) == 1


def test_the_body_of_a_reply_is_never_read_a_huge_one_holds_nothing():
    stop = threading.Event()

    def huge(conn: socket.socket) -> None:
        with conn:
            try:  # 10 GB announced, a little sent, then nothing until the client leaves
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n" + b"x" * 65536)
                stop.wait(30)
            except OSError:
                pass

    srv, port = _raw_server(huge)
    delivery = HttpDelivery("webhook", timeout=20, retries=0)
    try:
        start = time.monotonic()
        delivery.submit(f"http://127.0.0.1:{port}/hook", {"n": 1})
        assert delivery.flush(10)
        assert time.monotonic() - start < 5  # reading the body waited for the timeout, then failed
    finally:
        stop.set()
        delivery.close()
        srv.close()
    assert (delivery.sent, delivery.failed) == (1, 0)  # the receiver answered 200: delivered


def test_an_alertmanager_base_url_with_a_query_keeps_it_after_the_api_path():
    alert = Alert(rule="loss.nonfinite", severity=Severity.critical, step=3, message="m", hint="h", run="r")
    with ScriptedEndpoint() as am:
        sink = AlertmanagerSink(am.url + "am/?token=abc", retries=0, resend_seconds=3600)
        sink.emit(alert)
        [got] = am.wait_requests(1)
        sink.close()
    assert got["path"] == "/am/api/v2/alerts?token=abc"
    assert json.loads(got["body"])[0]["labels"]["alertname"] == "loss.nonfinite"


# -- /metrics: a label value UTF-8 cannot encode ------------------------------------------------------


def test_a_label_value_utf8_cannot_encode_does_not_fail_the_scrape():
    registry = CollectorRegistry()
    g = Gauge("trainmon_test_value", "a value", ["run"], registry=registry)
    g.labels("x\ud800y").set(1)  # what json.loads makes of run.json's "run_id": "x\\ud800y"
    g.labels("fine").set(2)
    server = serve(registry, "127.0.0.1", 0)
    try:
        for query in ("", "?name[]=trainmon_test_value"):
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics{query}", timeout=10) as r:
                assert r.status == 200
                text = r.read().decode("utf-8")
            assert 'trainmon_test_value{run="x?y"} 1.0' in text and 'trainmon_test_value{run="fine"} 2.0' in text
    finally:
        server.close()


# -- the CLI: option values and files that are not what they should be --------------------------------


@pytest.mark.parametrize("args, needle", [
    (["--poll", "inf"], "--poll"),  # was a traceback (OverflowError) once the loop started
    (["--poll", "nan"], "--poll"),  # was a busy loop
    (["--poll", "0"], "--poll"),
    (["--discover", "-1"], "--discover"),
    (["--metrics-port", "70000"], "0..65535"),  # was "no free port ... in 70000..70049: None"
    (["--metrics-port", "-2"], "0..65535"),  # was silently off
])
def test_watch_refuses_bad_timing_and_port_values(tmp_path, args, needle):
    result = runner.invoke(app, ["watch", str(tmp_path), "--once", "--plain", "--state-dir",
                                 str(tmp_path / "state"), *args])
    _one_line_error(result, needle)


def test_watch_names_a_state_dir_that_is_a_file(tmp_path):
    (tmp_path / "state").write_text("")
    result = runner.invoke(app, ["watch", str(tmp_path), "--once", "--metrics-port", "-1", "--state-dir",
                                 str(tmp_path / "state")])
    _one_line_error(result, "--state-dir", "not a directory")


def test_check_report_of_a_run_whose_name_utf8_cannot_hold(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"run_id": "x\\ud800<script>"}', encoding="utf-8")  # valid JSON, a lone surrogate
    report = tmp_path / "report.html"
    result = runner.invoke(app, ["check", str(run), "--report", str(report)])
    assert result.exit_code == 0, result.output  # was 4: "failed unexpectedly: UnicodeEncodeError"
    html = report.read_text(encoding="utf-8")
    assert "x\ufffd&lt;script&gt;" in html and "<script" not in html  # replaced where run.json is read


def test_check_names_an_invalid_run_json_on_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"run_id": "r", "schedule": {"warmup_steps": "zz"}}), encoding="utf-8")
    _one_line_error(runner.invoke(app, ["check", str(run)]), "unreadable run.json", "warmup_steps")


@pytest.mark.parametrize("command", [["prometheus-rules"], ["scrape-config", "{runs}"]])
def test_export_to_a_directory_is_an_error_not_a_traceback(tmp_path, command):
    (tmp_path / "runs").mkdir()
    args = [a.format(runs=tmp_path / "runs") for a in command]
    result = runner.invoke(app, ["export", *args, "--out", str(tmp_path)])
    _one_line_error(result, f"cannot write {tmp_path}", "Is a directory")


@pytest.mark.parametrize("args, needle", [
    (["--job", 'x"} or vector(1) #'], "--job"),  # was pasted into every PromQL selector
    (["--job", "a\nb"], "--job"),
    (["--interval", "banana"], "--interval"),
    (["--refresh-interval", "5 minutes"], "--refresh-interval"),
    (["--daemon", "somehost"], "--daemon"),
    (["--alertmanager", "am:99999"], "--alertmanager"),
])
def test_export_scrape_config_refuses_what_prometheus_would(tmp_path, args, needle):
    (tmp_path / "runs").mkdir()
    out = tmp_path / "prometheus.yml"
    result = runner.invoke(app, ["export", "scrape-config", str(tmp_path / "runs"), "--out", str(out), *args])
    _one_line_error(result, needle)
    assert not out.exists()


def test_export_prometheus_rules_refuses_a_job_that_would_rewrite_the_expressions(tmp_path):
    result = runner.invoke(app, ["export", "prometheus-rules", "--job", 'x"} or vector(1) #'])
    _one_line_error(result, "--job")
    assert "vector(1)" not in result.stdout


def test_train_refuses_a_checkpoint_dir_that_is_a_file_before_training(tmp_path):
    (tmp_path / "ckpt").write_text("")
    result = runner.invoke(app, ["train", "--steps", "1", "--no-monitor", "--no-progress", "--checkpoint-dir",
                                 str(tmp_path / "ckpt" / "sub")])
    _one_line_error(result, "--checkpoint-dir", "is not a directory")


@pytest.mark.parametrize("job", ['x"} or vector(1) #', "a\\b", "line\nbreak", ""])
def test_the_export_api_refuses_a_job_that_cannot_go_into_a_selector(tmp_path, job):
    """The Python API, not only the CLI: every exported expression selects job="<job>"."""
    from monitor.exporters import grafana_dashboards, promrules, scrape

    for make in (lambda: promrules.prometheus_rules(None, job), lambda: grafana_dashboards.dashboards(None, job),
                 lambda: scrape.scrape_config([tmp_path], job, daemon="127.0.0.1:9739")):
        with pytest.raises(ValueError, match=r"job .*without quotes, backslashes or control characters"):
            make()
