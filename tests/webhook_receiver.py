"""A webhook receiver for tests: a threaded HTTP server on loopback that records every POST (its headers, lower-cased,
and the exact body bytes, which the signature covers) and answers each with the next of its scripted `answers`
(a status code, or HANG: no answer until the receiver stops), then 200 once the script runs out.

    with WebhookReceiver(answers=[500, 500, 500]) as receiver:
        ...  # point an endpoint at receiver.url
        [first, *_] = receiver.wait_requests(4, timeout=30)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# An answer that never comes: the request is held until the receiver stops (the sender's timeout fires first).
HANG = -1


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived


class WebhookReceiver:
    def __init__(self, answers: list[int] | None = None) -> None:
        self.answers = list(answers or [])
        self.requests: list[Received] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {key.lower(): value for key, value in self.headers.items()}
                with receiver.lock:
                    receiver.requests.append(Received(self.path, headers, body, time.monotonic()))
                    answer = receiver.answers.pop(0) if receiver.answers else 200
                if answer == HANG:
                    receiver.stopping.wait(60)
                    return
                self.send_response(answer)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:  # quiet: a failing test shows what it asserts instead
                pass

        return Handler

    def received(self) -> list[Received]:
        """The POSTs so far (a copy, safe to read while more arrive)."""
        with self.lock:
            return list(self.requests)

    def wait_requests(self, count: int, *, timeout: float) -> list[Received]:
        """The POSTs, once at least `count` arrived; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(got := self.received()) >= count:
                return got
            time.sleep(0.05)
        raise TimeoutError(f"{count} webhook POSTs not received within {timeout} s (got {len(self.received())})")

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
