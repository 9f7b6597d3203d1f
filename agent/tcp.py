"""TCP socket options both sides' MQTT clients use. Stdlib only."""

from __future__ import annotations

import logging
import socket
from typing import Any

log = logging.getLogger("agent.tcp")


def no_delay(client: Any, userdata: Any, sock: Any) -> None:
    """paho's ``on_socket_open``: set TCP_NODELAY on the broker connection.

    paho leaves Nagle's algorithm on, so a small write that follows another before the broker has
    acknowledged it at the TCP level (a chunk request right after the ``download.started`` event, a PUBACK)
    waits for the broker's delayed ACK, ~40 ms on Linux: that was a third of a 32 MB transfer at rest
    (docs/benchmarks.md, "Artifact transfer"). mosquitto sets it on its side (``set_tcp_nodelay``).
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # not a TCP socket (a websocket wrapper): works without it
        log.debug("cannot set TCP_NODELAY on the broker connection: %s", exc)
