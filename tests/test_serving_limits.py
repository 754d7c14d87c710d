"""`ferkit serve`'s connection limits against a real uvicorn server (issue #26): slow headers, slow bodies,
mid-upload disconnects and the connection cap, with raw sockets.

Each test starts its own server on 127.0.0.1 (a free port), in a thread, with short timeouts; every socket
and the server are closed at the end, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from ferkit.inference import Recognizer  # noqa: E402
from ferkit.serving import ServeSettings, create_app  # noqa: E402
from ferkit.serving.server import uvicorn_options  # noqa: E402

HOST = "127.0.0.1"  # loopback only


@contextlib.contextmanager
def running_server(rec: Recognizer, **settings) -> Iterator[int]:
    """A uvicorn server for create_app(settings) on 127.0.0.1, with `ferkit serve`'s options; yields its port."""
    settings = ServeSettings(workers=2, warmup=False, **settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))  # a free port chosen by the OS
    # log_config=None: uvicorn leaves logging alone, so its records reach pytest's caplog
    config = uvicorn.Config(create_app(settings, recognizer=rec), log_config=None, **uvicorn_options(settings))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


# Upper bounds on waits are generous (CI runs on 2 busy cores): a test fails on a server that never acts, not on
# a slow machine. Lower bounds stay where a test checks that a timeout is honoured.
SLACK = 10.0


def wait_until(condition, timeout: float = SLACK, what: str = "the condition") -> None:
    """Poll `condition()` until it is true; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not seen within {timeout:g} s"
        time.sleep(0.02)


def connect(port: int) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=5)
    s.settimeout(0.2)
    return s


def closed_by_server(s: socket.socket, wait: float = 0.2) -> bool:
    """True once the server has closed `s` (EOF or reset); False while it is open (after waiting `wait` s)."""
    s.settimeout(wait)
    try:
        return s.recv(65536) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def healthz_status(port: int) -> int:
    """The HTTP status a fresh connection gets for GET /healthz."""
    s = connect(port)
    try:
        s.sendall(f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        return int(read_all(s, 5).split(b" ", 2)[1])
    finally:
        s.close()


def read_until_closed(s: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection or `timeout` s pass, and whether it closed it."""
    s.settimeout(timeout)
    chunks = []
    try:
        while chunk := s.recv(65536):
            chunks.append(chunk)
        closed = True
    except TimeoutError:
        closed = False
    except ConnectionError:
        closed = True
    return b"".join(chunks), closed


def read_all(s: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection, or until `timeout` s."""
    return read_until_closed(s, timeout)[0]


def test_slow_headers_are_cut_off(rec: Recognizer) -> None:
    """Ten clients that send their headers one byte at a time are disconnected after the header timeout."""
    timeout = 1.0
    with running_server(rec, header_timeout=timeout, keep_alive_timeout=30) as port:
        clients = [connect(port) for _ in range(10)]
        try:
            start = time.monotonic()
            head = f"POST /v1/analyze HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode()
            open_, i = list(clients), 0
            while open_ and time.monotonic() - start < timeout + SLACK:  # each client sends a byte every ~0.1 s
                for s in list(open_):
                    with contextlib.suppress(OSError):
                        s.send(head[i:i + 1] if i < len(head) else b"a")
                    if closed_by_server(s, wait=0.005):
                        open_.remove(s)
                i += 1
                time.sleep(0.1)
            elapsed = time.monotonic() - start
            assert not open_, f"{len(open_)} of 10 slow-header connections still open after {elapsed:.1f} s"
            assert elapsed > timeout * 0.8, f"cut off after {elapsed:.1f} s, before the {timeout} s header timeout"
            # the server still answers a normal client
            assert healthz_status(port) == 200
        finally:
            for s in clients:
                s.close()


def test_slow_body_gets_408_and_is_closed(rec: Recognizer) -> None:
    with running_server(rec, body_timeout=1.0, header_timeout=5) as port:
        s = connect(port)
        try:
            s.sendall(f"POST /v1/analyze HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/jpeg\r\n"
                      "Content-Length: 100000\r\n\r\n".encode() + b"x" * 1000)
            start = time.monotonic()
            answer = b""
            while time.monotonic() - start < 1.0 + SLACK and not answer:  # keep trickling: a byte every 0.1 s
                with contextlib.suppress(OSError):
                    s.send(b"x")
                with contextlib.suppress(TimeoutError):
                    answer = s.recv(65536)
                time.sleep(0.1)
            elapsed = time.monotonic() - start
            # the first recv may hold only the head of the answer (CI once saw the headers without the body)
            rest, closed = read_until_closed(s, 2)
            answer += rest
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"body_timeout" in answer and b"connection: close" in answer.lower(), answer[-300:]
            assert elapsed > 0.8, f"answered after {elapsed:.1f} s, before the 1 s body timeout"
            assert closed, "the server kept the connection open after its 408"
        finally:
            s.close()


def test_client_disconnect_mid_upload_is_not_an_error(rec: Recognizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), running_server(rec) as port:
        for _ in range(3):
            s = connect(port)
            s.sendall(f"POST /v1/analyze HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/jpeg\r\n"
                      "Content-Length: 100000\r\n\r\n".encode() + b"x" * 5000)
            time.sleep(0.2)  # mid-upload (a slower server that reads it later still sees the disconnect)
            s.close()
        wait_until(lambda: any("disconnected" in r.getMessage() for r in caplog.records),
                   what="the server logging the disconnect")
        assert healthz_status(port) == 200
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]
    assert any("disconnected" in r.getMessage() for r in caplog.records)


def test_connection_cap_answers_503(rec: Recognizer) -> None:
    with running_server(rec, max_connections=4, header_timeout=5) as port:
        idle = [connect(port) for _ in range(4)]
        try:  # once the server has taken the 4 idle connections, a 5th is turned away
            wait_until(lambda: healthz_status(port) == 503, what="503 with 4 connections open")
        finally:
            for s in idle:
                s.close()
        wait_until(lambda: healthz_status(port) == 200, what="200 once the idle connections closed")
