"""Many paho clients on one asyncio loop.

A thread per client (paho's `loop_start`) or an aiomqtt client per device costs several times the CPU
of driving raw paho clients from one selector (DESIGN.md §4). paho exposes the hooks for that: it
tells us when a socket opens or closes and when it has bytes to send; the loop tells it when a socket
is readable or writable; one periodic sweep runs the keep-alive bookkeeping for every client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import paho.mqtt.client as mqtt

logger = logging.getLogger(__name__)


class NonBlockingConnectClient(mqtt.Client):
    """A paho client that takes a TCP connection opened beforehand by the event loop.

    paho opens its connection with a blocking `socket.create_connection`, which would stall every
    other simulated device for one round trip per connect; the caller connects with
    `loop.sock_connect` instead and hands the socket over through `prepared_socket`.
    """

    prepared_socket: socket.socket | None = None

    def _create_socket_connection(self) -> socket.socket:
        prepared, self.prepared_socket = self.prepared_socket, None
        if prepared is None:
            raise ConnectionError("no TCP connection was prepared for this MQTT client")
        return prepared


async def open_tcp_connection(
    address: tuple[Any, ...], family: socket.AddressFamily, timeout: float
) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        # Reports are small and latency-bound: without this, Nagle holds a second report back
        # until the broker acknowledges the first.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


class PahoLoopDriver:
    """Registers paho sockets with the running asyncio loop and sweeps `loop_misc` periodically."""

    def __init__(self, *, misc_interval_s: float = 1.0) -> None:
        self._loop = asyncio.get_running_loop()
        self._misc_interval_s = misc_interval_s
        self._clients: set[mqtt.Client] = set()
        self._flush_pending: dict[mqtt.Client, None] = {}
        self._flush_scheduled = False
        self._sweeper = self._loop.create_task(self._sweep_forever(), name="paho-loop-misc")

    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        self._clients.add(client)

    def detach(self, client: mqtt.Client) -> None:
        """Forgets the client; a socket it still holds is unregistered and closed."""
        self._clients.discard(client)
        self._flush_pending.pop(client, None)
        # paho closes its socket again when the client is collected; by then the loop must not hear
        # about it, or it would unregister a descriptor number that may already belong to another.
        client.on_socket_open = None
        client.on_socket_close = None
        client.on_socket_register_write = None
        client.on_socket_unregister_write = None
        sock = client.socket()
        if sock is not None:
            self._loop.remove_reader(sock.fileno())
            self._loop.remove_writer(sock.fileno())
            sock.close()

    async def aclose(self) -> None:
        self._sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sweeper
        for client in list(self._clients):
            self.detach(client)

    def _on_socket_open(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._loop.add_reader(sock, client.loop_read)

    def _on_socket_close(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._flush_pending.pop(client, None)
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)

    def _on_socket_register_write(self, client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        # The socket is almost always writable, so instead of registering a writer (two epoll_ctl
        # calls per publish) write every pending client once per loop iteration, and fall back to
        # a writer only for the rare socket whose send buffer is full.
        self._flush_pending[client] = None
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _on_socket_unregister_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._flush_pending = self._flush_pending, {}
        for client in pending:
            client.loop_write()
            sock = client.socket()
            if sock is not None and client.want_write():
                self._loop.add_writer(sock, client.loop_write)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._misc_interval_s)
            for client in list(self._clients):
                client.loop_misc()
