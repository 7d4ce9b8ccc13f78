"""Closing a listening socket that another thread is blocked on in accept()."""

from __future__ import annotations

import contextlib
import socket
import threading


def close_listener(sock: socket.socket, acceptor: threading.Thread | None, timeout: float = 5.0) -> None:
    """Stop `acceptor` (blocked in `sock.accept()`), then close `sock`.

    close() alone does not wake a thread blocked in accept() on Linux: the socket goes on listening, and once its
    descriptor number is reused by the next listener, that thread accepts connections meant for the new one (seen:
    a test's recorder lost a connection to the previous test's). shutdown() wakes it with an error first.
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    if acceptor is not None and acceptor is not threading.current_thread():
        acceptor.join(timeout)
    sock.close()
