"""
The console's messages page of an organisation with many messages: how long
it takes to answer, through a real socket, signed in with the org's token.

    python -m bench.console_page [--messages 10000] [--requests 20] [--postgres DSN]

Fills a fresh SQLite database (or a PostgreSQL one, given a DSN to a
scratch database) with C{--messages} messages of one organisation, half of
them parsed with a document, then times the first page, a page deep in the
cursor chain, a status filter, a date range and a subject search. Prints
p50/max per page; the target is under 300 ms.
"""

import argparse
import re
import secrets
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import urlencode

import treq
from twisted.internet import defer, task

from mailingest.console.rejections import RejectionHistory
from mailingest.console.resource import COOKIE, SIGN_IN_COOKIE, make_site
from mailingest.handoff.api import encode_cursor, new_token, token_hash
from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.storage.blobs import open_blobs
from mailingest.storage.store import open_store

BATCH = 500


async def fill(store, org_id: int, count: int) -> list[int]:
    start = datetime.now(timezone.utc) - timedelta(days=30)
    ids = []
    for first in range(0, count, BATCH):
        rows = [
            {
                "org_id": org_id, "source": "smtp", "source_message_id": f"<bench-{n}@customer.test>",
                "mail_from": f"buyer{n % 50}@customer.test", "rcpt_to": "orders+bench@example.com",
                "subject": f"Order {n}", "raw_key": f"raw/{n}", "raw_size": 1000, "raw_sha256": "ab" * 32,
                "received_at": start + timedelta(minutes=4 * n),
            }
            for n in range(first, min(first + BATCH, count))
        ]
        ids += await store.insert_messages(rows)
    for message_id in ids[::2]:
        document = {
            "org_id": org_id, "ordinal": 0, "filename": "order.pdf", "content_type": "application/pdf",
            "size": 100, "sha256": "cd" * 32, "storage_key": f"doc/{message_id}",
        }
        await store.mark_parsed(message_id, [document])
    return ids


async def main(reactor, options) -> None:
    directory = tempfile.mkdtemp(prefix="console-bench-")
    store = open_store(options.postgres or f"sqlite:///{directory}/bench.db", MESSAGE_EVENTS)
    await store.migrate()
    blobs = open_blobs(f"file:{directory}/blobs")
    org = await store.add_org("bench", "Bench")
    token = new_token()
    await store.add_token("bench", token_hash(token))
    began = time.monotonic()
    ids = await fill(store, org["id"], options.messages)
    print(f"filled {len(ids)} messages in {time.monotonic() - began:.1f} s", file=sys.stderr)
    port = reactor.listenTCP(0, make_site(store, blobs, reactor, RejectionHistory(reactor)), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    form_token = secrets.token_urlsafe(32)  # the sign-in form's token, in its cookie and its field
    response = await treq.post(
        base + "/console/sign-in",
        data={"token": token, "csrf": form_token},
        headers={"Cookie": f"{SIGN_IN_COOKIE.decode()}={form_token}"},
        allow_redirects=False,
        persistent=False,
    )
    cookie = re.match(rf"{COOKIE.decode()}=([^;]+)", response.headers.getRawHeaders("set-cookie")[0]).group(1)
    today = datetime.now(timezone.utc).date()
    pages = {
        "first page": {},
        "deep cursor": {"cursor": encode_cursor(ids[len(ids) // 3])},
        "status=parsed": {"status": "parsed"},
        "date range": {"from": (today - timedelta(days=20)).isoformat(), "to": (today - timedelta(days=10)).isoformat()},
        "search subject": {"q": "order 77"},
        "search, no match": {"q": "no such text"},
    }
    print(f"{'page':<18} {'p50 ms':>8} {'max ms':>8}")
    for name, query in pages.items():
        url = f"{base}/console/orgs/{org['id']}/messages?{urlencode(query)}"
        times = []
        for _ in range(options.requests):
            began = time.monotonic()
            response = await treq.get(url, headers={"Cookie": f"{COOKIE.decode()}={cookie}"}, persistent=False)
            body = await treq.content(response)
            times.append((time.monotonic() - began) * 1000)
            assert response.code == 200 and b"<table" in body, (response.code, body[:200])
        print(f"{name:<18} {statistics.median(times):8.1f} {max(times):8.1f}")
    await port.stopListening()
    await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--postgres", help="DSN of a scratch PostgreSQL database (default: SQLite in a temp dir)")
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parser.parse_args())))
