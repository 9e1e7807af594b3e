"""A free TCP port for a server a test starts in another process."""

import random
import socket


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(n) for n in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, chosen outside the kernel's ephemeral range.

    A port the kernel picks for bind(0) comes from that range, and once released any
    connect() may take it as its local port before the server binds it (a parallel
    test's client, a PostgreSQL connection): the server then fails with EADDRINUSE.
    Below the range only another test's choice can collide, and the choice is random.
    """
    low, high = _ephemeral_range()
    choices = range(10000, low) if low > 11000 else range(high + 1, 65536)
    for _ in range(200):
        port = random.choice(choices)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1")
