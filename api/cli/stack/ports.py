"""TCP ports on this host: a free one to listen on, and whether a given one is.

``lmbatch up`` checks the API's and Flower's ports before it starts anything (a taken port is one line, not a
child dying mid-start), the embedded Redis and ``lmbatch demo`` pick free ones, and the tests use the same
helpers for their own servers.
"""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the kernel's pick); another process may take it before the caller does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (``""`` means every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Without SO_REUSEADDR a port in TIME_WAIT would look taken, though uvicorn and Tornado can bind it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "0.0.0.0", port))
        except OSError:
            return False
    return True
