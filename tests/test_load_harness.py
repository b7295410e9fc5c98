"""benchmarks.load reading per-worker series from a server's /metrics."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from benchmarks.load import per_worker

TWO_WORKERS = """\
# TYPE facesvc_serving gauge
facesvc_serving{pid="101"} 1.0
facesvc_serving{pid="102"} 0.0
# TYPE facesvc_worker_calls gauge
facesvc_worker_calls{method="grpc.health.v1.Health/Check",pid="101"} 3.0
facesvc_worker_calls{method="facesvc.v1.FaceVerification/Verify",pid="101"} 9.0
"""
ONE_PROCESS = """\
# TYPE facesvc_serving gauge
facesvc_serving 1.0
"""


@pytest.fixture
def metrics_url() -> Iterator[tuple[str, list[str]]]:
    """A /metrics endpoint answering with the text last put in the list."""
    texts: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = texts[-1].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", texts
    finally:
        server.shutdown()


def test_per_worker_series_by_pid_and_label(metrics_url: tuple[str, list[str]]) -> None:
    url, texts = metrics_url
    texts.append(TWO_WORKERS)
    assert per_worker(url, "facesvc_serving") == {101: 1.0, 102: 0.0}
    health = per_worker(url, "facesvc_worker_calls", method="grpc.health.v1.Health/Check")
    assert health == {101: 3.0}


def test_a_one_process_servers_series_is_keyed_zero(metrics_url: tuple[str, list[str]]) -> None:
    url, texts = metrics_url
    texts.append(ONE_PROCESS)
    assert per_worker(url, "facesvc_serving") == {0: 1.0}


def test_nothing_answering_reads_as_no_series() -> None:
    assert per_worker("http://127.0.0.1:9/metrics", "facesvc_serving") == {}
