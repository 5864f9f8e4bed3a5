"""The serial link: the one module that imports pyserial.

Rules:

* A link is opened from a URL as pyserial understands it: a device path
  (``/dev/ttyUSB0``, a pty slave such as ``/dev/pts/7``), ``socket://host:port``
  or ``loop://``. :func:`open_pty_pair` makes a new pty for a simulated node and
  returns the path a gateway opens.
* Reads wait at most ``timeout_s`` and return what arrived (possibly nothing);
  writes block until the bytes are handed to the OS, at most ``write_timeout_s``.
* Every pyserial or OS failure is wrapped where it enters, with ``raise ...
  from``: :class:`LinkBroken` when the port vanished, timed out or failed,
  :class:`LinkClosed` when our own side closed it. Callers never see
  ``serial.SerialException``.
* Opening flushes the input queue: whatever a previous program left in the
  port is not ours to read.
"""

from __future__ import annotations

import contextlib
import os
import select
import termios
import tty
from collections.abc import Callable
from typing import Protocol, Self

import serial

from otaproto.errors import LinkBroken, LinkClosed

DEFAULT_BAUD = 115200
#: Waits between attempts to reopen a port that broke (a USB adapter re-enumerating).
REOPEN_BACKOFF_S = (0.05, 0.2, 0.5, 1.0, 2.0)


class Link(Protocol):
    """What the gateway driver and the simulated node need from a byte link."""

    def read(self, max_bytes: int, timeout_s: float) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class SerialLink:
    """A pyserial port behind Shoal's error types."""

    def __init__(
        self, url: str, *, baud: int = DEFAULT_BAUD, write_timeout_s: float = 10.0
    ) -> None:
        """Open ``url``. Raises LinkBroken when it cannot be opened."""
        self.url = url
        try:
            self._port = serial.serial_for_url(
                url, baudrate=baud, timeout=0, write_timeout=write_timeout_s, exclusive=None
            )
            self._port.reset_input_buffer()
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LinkBroken(f"cannot open serial port {url}: {_reason(exc)}") from exc
        self._closed = False

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        """Up to ``max_bytes``, waiting at most ``timeout_s`` for the first one."""
        port = self._usable()
        try:
            waiting = port.in_waiting
            if waiting:
                data: bytes = port.read(min(waiting, max_bytes))
                return data
            port.timeout = max(0.0, timeout_s)
            first: bytes = port.read(1)
            if not first:
                return b""
            waiting = port.in_waiting
            return first + (port.read(min(waiting, max_bytes - 1)) if waiting else b"")
        except (serial.SerialException, OSError) as exc:
            raise LinkBroken(f"serial port {self.url} failed: {_reason(exc)}") from exc

    def write(self, data: bytes) -> None:
        """Hand all of ``data`` to the port. Raises LinkBroken, LinkClosed."""
        port = self._usable()
        try:
            port.write(data)
        except serial.SerialTimeoutException as exc:
            raise LinkBroken(f"serial port {self.url}: write timed out") from exc
        except (serial.SerialException, OSError) as exc:
            raise LinkBroken(f"serial port {self.url} failed: {_reason(exc)}") from exc

    def close(self) -> None:
        """Close the port; idempotent."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(serial.SerialException, OSError):
                self._port.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _usable(self) -> serial.Serial:
        if self._closed:
            raise LinkClosed(f"serial port {self.url} was closed")
        return self._port


class PtyLink:
    """The controller side of a new pty: a simulated node's end of its serial port.

    The other side's path (:attr:`path`) is what a gateway opens. Raw mode, no
    echo, no flow control. Raises LinkBroken on OS failure.
    """

    def __init__(self) -> None:
        try:
            self._fd, self._peer_fd = os.openpty()
            tty.setraw(self._peer_fd, termios.TCSANOW)
            attrs = termios.tcgetattr(self._peer_fd)
            attrs[0] &= ~(termios.IXON | termios.IXOFF)
            termios.tcsetattr(self._peer_fd, termios.TCSANOW, attrs)
            self.path = os.ttyname(self._peer_fd)
        except OSError as exc:
            raise LinkBroken(f"cannot create a pty: {_reason(exc)}") from exc
        self._closed = False

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        if self._closed:
            raise LinkClosed("pty was closed")
        try:
            ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout_s))
            return os.read(self._fd, max_bytes) if ready else b""
        except OSError as exc:
            raise LinkBroken(f"pty {self.path} failed: {_reason(exc)}") from exc

    def write(self, data: bytes) -> None:
        if self._closed:
            raise LinkClosed("pty was closed")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise LinkBroken(f"pty {self.path} failed: {_reason(exc)}") from exc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for fd in (self._fd, self._peer_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return (str(exc).strip() or type(exc).__name__).splitlines()[0][:120]


def reopen(
    open_link: Callable[[], Link],
    patience_s: float,
    *,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> Link:
    """Open a port again with backoff (:data:`REOPEN_BACKOFF_S`) for up to ``patience_s``.

    Raises the last LinkBroken when it still does not open.
    """
    give_up_at = clock() + patience_s
    attempt = 0
    while True:
        try:
            return open_link()
        except LinkBroken:
            if clock() >= give_up_at:
                raise
            sleep(REOPEN_BACKOFF_S[min(attempt, len(REOPEN_BACKOFF_S) - 1)])
            attempt += 1
