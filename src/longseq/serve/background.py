"""The server on a free local port in a background thread, for the demo and the tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from longseq.errors import LongseqError


@contextmanager
def running(app, host: str = "127.0.0.1", start_timeout: float = 10.0) -> Iterator[str]:
    """Serves `app` (create_app's) while the block runs; yields its base URL, then stops the server."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))  # port 0: the OS picks a free one, and the socket holds it until uvicorn serves on it
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise LongseqError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
