"""
The Python baseline: an aiosmtpd server that keeps each message in its own file.

This is what one would write first in Python: accept anything, write the
message to a file, fsync it, answer 250. It does less than mailingest (no
recipient lookup, no database row, no directory fsync, no extraction), so it is
a fair floor for "a durable Python SMTP server". The write runs in asyncio's
default thread pool, as a careful author would do, so that concurrent sessions
overlap their fsyncs instead of queueing behind one blocking call.

Run as a child process by L{bench.targets}:
C{python -m bench.aiosmtpd_baseline PORT DIRECTORY}.
"""

import asyncio
import os
import signal
import sys
import uuid

from aiosmtpd.smtp import SMTP, Envelope, Session

MAX_MESSAGE_SIZE = 60_000_000


def write_durably(path: str, data: bytes) -> None:
    """The whole message, then fsync: the 250 means the bytes are on disk."""
    with open(path, "xb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


class FileHandler:
    def __init__(self, directory: str):
        self.directory = directory

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        path = os.path.join(self.directory, uuid.uuid4().hex + ".eml")
        await asyncio.to_thread(write_durably, path, envelope.original_content)
        return "250 2.0.0 OK"


async def serve(port: int, directory: str) -> None:
    loop = asyncio.get_running_loop()
    handler = FileHandler(directory)
    server = await loop.create_server(
        lambda: SMTP(handler, data_size_limit=MAX_MESSAGE_SIZE, hostname="aiosmtpd.bench"),
        host="127.0.0.1",
        port=port,
    )
    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    loop.add_signal_handler(signal.SIGINT, stopped.set)
    async with server:
        await stopped.wait()


def main(argv: list[str]) -> None:
    port, directory = int(argv[1]), argv[2]
    os.makedirs(directory, exist_ok=True)
    asyncio.run(serve(port, directory))


if __name__ == "__main__":
    main(sys.argv)
