"""
Retention, legal hold and erasure end to end (issue 26): against the blob
store's own listing on local disk with SQLite and on S3 (moto) with
PostgreSQL, the admin commands, a daemon killed with SIGKILL in the middle
of a pass, and the API and console showing tombstones.
"""

import hashlib
import json
import os
import signal
import time

from twisted.internet import defer, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.ops import metrics
from mailingest.storage.blobs import open_blobs
from mailingest.storage.retention import RetentionService, run_pass
from mailingest.storage.store import open_store
from mailingest.storage.stores import search
from mailingest.storage.sweeper import sweep
from tests import postgres
from tests.daemon import TwistdProcess, mailingest_cli, poll, temp_dir
from tests.moto import shared_server
from tests.retention_contract import later
from tests.store_contract import message
from tests.test_api import order
from tests.test_console import ConsoleCase
from tests.test_gc import put, stored_keys

DAY = 86400


async def populate(store, blobs, senders: dict[str, list[str]], documents: int = 1, tag: str = "") -> dict[int, list[str]]:
    """
    Parsed messages, each with its raw copy and documents stored: for each
    organisation slug in C{senders} one message from each address listed
    (added in order). Fires with each message id's blob keys.
    """
    keys = {}
    for slug, addresses in senders.items():
        org = await store.get_org(slug) or await store.add_org(slug, slug.title())
        for n, sender in enumerate(addresses):
            raw = f"raw/2024/05/01/{slug}{tag}-{n}.eml"
            [message_id] = await store.insert_messages([message(org["id"], f"<{slug}{tag}-{n}@x>", raw_key=raw, mail_from=sender)])
            rows = []
            for ordinal in range(documents):
                key = f"documents/{org['id']}/{message_id}/{ordinal}"
                rows.append({
                    "org_id": org["id"], "ordinal": ordinal, "filename": "po.pdf", "content_type": "application/pdf",
                    "size": len(key), "sha256": hashlib.sha256(key.encode()).hexdigest(), "storage_key": key,
                })
            await store.mark_parsed(message_id, rows)
            keys[message_id] = [raw] + [row["storage_key"] for row in rows]
    await put(blobs, [key for found in keys.values() for key in found])
    return keys


async def indexed_senders(store, message_ids: list[int]) -> list[str]:
    """The senders SQLite's search index file holds for these messages, found by the senders' text (none on PostgreSQL)."""
    if store.engine.text_search != "fts5":
        return []

    def read(txn):
        return txn.execute("SELECT rowid, mail_from FROM message_search WHERE message_search MATCH '\"jane@x.test\"'").addCallback(
            lambda _: [(search.SEARCH_ORG_SPAN - row["rowid"] % search.SEARCH_ORG_SPAN, row["mail_from"].lower()) for row in txn.fetchall()]
        )

    found = await store.engine.search_index(read)
    return [sender for message_id, sender in found if message_id in message_ids]


class BlobStoreCases:
    """The same checks on local disk with SQLite and on S3 with PostgreSQL."""

    def open(self):
        raise NotImplementedError

    async def cli(self, *args: str) -> tuple[int, str, str]:
        result = await threads.deferToThread(mailingest_cli, self.directory, *self.options, *args, env=self.env)
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    async def test_past_retention_incinerated_with_tombstone_and_audit_held_kept(self):
        store, blobs = self.open()
        await store.migrate()
        keys = await populate(store, blobs, {"acme": ["a@x.test"] * 3, "globex": ["a@x.test"]})
        old, held, third, elsewhere = sorted(keys)
        code, out, err = await self.cli("org", "retention", "acme", "--raw", "90d")
        self.assertEqual((code, out), (0, "retention of acme: raw 90d, documents keep\n"), err)
        code, out, err = await self.cli("hold", "add", "--org", "acme", "--message", str(held), "--reason", "dispute 7")
        self.assertEqual((code, out), (0, f"added legal hold 1 on message {held} of acme\n"), err)
        # an erasure whose blobs are still queued (as a killed daemon would leave them): the pass deletes them first
        await store.erase_message(third, "cli:test")
        before = await stored_keys(blobs)
        counted = metrics.INCINERATED.labels("retention")._value.get()

        done = await run_pass(store, blobs, batch=1)
        self.assertEqual((done.messages, done.batches, done.blobs), (1, 1, 3))
        self.assertEqual(metrics.INCINERATED.labels("retention")._value.get(), counted + 1)
        # the raw copy is gone, its documents (kept forever) stay
        self.assertEqual(before - await stored_keys(blobs), {keys[old][0], *keys[third]})
        row = await store.get_message(old)
        self.assertEqual((row["status"], row["incinerated_reason"], row["raw_sha256"]), ("incinerated", "retention", "ab" * 32))
        self.assertEqual((await store.get_message(held))["status"], "parsed")
        self.assertEqual((await store.get_message(elsewhere))["status"], "parsed")
        code, out, _ = await self.cli("audit", "list", "--org", "acme", "--json")
        audit = json.loads(out)
        self.assertEqual(
            [(a["action"], a["actor"], a["inbound_message_id"], a["sha256"]) for a in audit][:1],
            [("incinerate", "retention", old, "ab" * 32)],
        )
        self.assertIn(("hold_add", held), [(a["action"], a["inbound_message_id"]) for a in audit])
        code, _, err = await self.cli("erase", "--message", str(held))
        self.assertEqual(code, 1)
        self.assertIn("under a legal hold", err)
        self.assertIn(keys[held][0], await stored_keys(blobs))
        code, out, err = await self.cli("messages", "raw", str(old))
        self.assertEqual(code, 1)
        self.assertIn(f"message {old} was incinerated (retention)", err)
        code, out, err = await self.cli("messages", "show", str(old))
        self.assertEqual(code, 0, err)
        self.assertIn(f"headers: cannot read the stored copy: message {old} was incinerated (retention)", out)
        self.assertIn("tombstone:\nincinerated_at:", out)
        code, out, _ = await self.cli("hold", "list", "--json")
        self.assertEqual([(h["id"], h["inbound_message_id"], h["reason"]) for h in json.loads(out)], [(1, held, "dispute 7")])
        code, out, err = await self.cli("hold", "remove", "1")
        self.assertEqual((code, out), (0, "removed legal hold 1 of acme\n"), err)
        self.assertEqual((await self.cli("hold", "list"))[1].splitlines()[1:], [])
        self.assertEqual((await run_pass(store, blobs)).messages, 1)
        self.assertNotIn(keys[held][0], await stored_keys(blobs))

    async def test_erasure_by_sender_removes_exactly_that_senders_blobs_of_that_organisation(self):
        store, blobs = self.open()
        await store.migrate()
        senders = {"acme": ["jane@x.test", "john@x.test", "Jane@X.test", "jane@x.test"], "globex": ["jane@x.test"]}
        keys = await populate(store, blobs, senders, documents=2)
        ids = sorted(keys)
        janes = [ids[0], ids[2], ids[3]]
        before = await stored_keys(blobs)
        self.assertEqual(before, {key for found in keys.values() for key in found})
        await store.index_search()
        self.assertEqual(await indexed_senders(store, janes), ["jane@x.test"] * 3 if store.engine.text_search == "fts5" else [])
        code, out, err = await self.cli("erase", "--sender", "JANE@x.test", "--org", "acme")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, f"erased 3 message(s) from jane@x.test of acme: {', '.join(map(str, janes))}\n")
        # The command's own process took their text out of SQLite's search index (no daemon runs).
        self.assertEqual(await indexed_senders(store, janes), [])
        self.assertEqual(before - await stored_keys(blobs), {key for i in janes for key in keys[i]})
        for message_id in janes:
            row = await store.get_message(message_id)
            self.assertEqual((row["status"], row["incinerated_reason"], row["mail_from"], row["subject"]), ("incinerated", "erasure", "", None))
        for message_id in (ids[1], ids[4]):
            self.assertEqual((await store.get_message(message_id))["status"], "parsed")
        self.assertEqual(await store.pending_purges(), [])


class LocalDiskSqlite(BlobStoreCases, unittest.TestCase):
    def open(self):
        self.directory = temp_dir(self)
        database = "sqlite:///" + os.path.join(self.directory, "m.db")
        storage = "file:" + os.path.join(self.directory, "blobs")
        self.options, self.env = ("--database", database, "--storage", storage), dict(os.environ)
        store, blobs = open_store(database, MESSAGE_EVENTS), open_blobs(storage)
        self.addCleanup(store.close)
        self.addCleanup(blobs.close)
        return store, blobs


    async def test_gc_and_retention_never_delete_what_the_other_needs(self):
        """The sweeper may finish retention's deletes, never take a live row's blob; retention keeps a raw copy a live row shares."""
        store, blobs = self.open()
        await store.migrate()
        keys = await populate(store, blobs, {"acme": ["a@x.test"] * 2})
        shared, alone = sorted(keys)
        globex = await store.add_org("globex", "Globex")
        await store.insert_messages([message(globex["id"], "<acme-0@x>", raw_key=keys[shared][0])])
        await store.set_retention("acme", raw=DAY)
        self.assertEqual(len(await store.incinerate_due(10)), 2)
        self.assertEqual(await store.pending_purges(), [keys[alone][0]])  # the shared copy is globex's too
        before = await stored_keys(blobs)
        found = await sweep(store, blobs, 0, now=lambda: time.time() + 60)
        self.assertEqual((found.orphans, before - await stored_keys(blobs)), (1, {keys[alone][0]}))
        done = await run_pass(store, blobs)
        self.assertEqual((done.blobs, await store.pending_purges()), (1, []))
        self.assertEqual(await stored_keys(blobs), before - {keys[alone][0]})
        self.assertIn(keys[shared][0], await stored_keys(blobs))


class S3Postgresql(BlobStoreCases, unittest.TestCase):
    def open(self):
        moto = shared_server()
        self.directory = temp_dir(self)
        database, storage = postgres.create_database(), f"s3://{moto.create_bucket()}/mail"
        self.env = dict(os.environ, AWS_ACCESS_KEY_ID=moto.access_key, AWS_SECRET_ACCESS_KEY=moto.secret_key)
        self.options = ("--database", database, "--storage", storage, "--s3-endpoint", moto.endpoint)
        store, blobs = open_store(database, MESSAGE_EVENTS), open_blobs(storage, moto.endpoint, None, self.env)
        self.addCleanup(store.close)
        self.addCleanup(blobs.close)
        return store, blobs


class KilledMidPass:
    """
    A daemon killed with SIGKILL while a pass incinerates 1,000 messages in
    batches, then restarted: every row is intact with its raw copy, or
    incinerated without it; none half.
    """

    COUNT = 1000

    def open(self) -> tuple:
        raise NotImplementedError

    async def watch_until_killed(self, daemon: TwistdProcess, blobs) -> None:
        raise NotImplementedError

    async def test_sigkill_during_a_pass_then_restart(self):
        store, blobs, args = self.open()
        await store.migrate()
        org = await store.add_org("acme", "Acme")
        rows = [message(org["id"], f"<k{n}@x>", raw_key=f"raw/2024/05/01/k{n}.eml") for n in range(self.COUNT)]
        ids = await store.insert_messages(rows)
        await defer.gatherResults([store.mark_parsed(i, []) for i in ids], consumeErrors=True)
        for start in range(0, self.COUNT, 200):
            await put(blobs, [row["raw_key"] for row in rows[start:start + 200]])
        await store.set_retention("acme", raw=DAY)
        key_of = {message_id: row["raw_key"] for message_id, row in zip(ids, rows)}

        daemon = TwistdProcess(self.directory, *args, "--gc-interval", "0", env=self.env)
        self.addCleanup(daemon.stop, signal.SIGKILL)
        await self.watch_until_killed(daemon, blobs)
        self.assertEqual(daemon.process.wait(10), -signal.SIGKILL)

        # Whatever the moment: a row still parsed has its blob; a blob of an incinerated row is only one still queued.
        stored = await stored_keys(blobs)
        queued = set(await store.pending_purges(self.COUNT))
        statuses = {row["id"]: row["status"] for row in await store.list_messages(limit=self.COUNT)}
        for message_id, status in statuses.items():
            if status == "parsed":
                self.assertIn(key_of[message_id], stored)
            elif key_of[message_id] in stored:
                self.assertIn(key_of[message_id], queued)
        incinerated = {i for i, status in statuses.items() if status == "incinerated"}
        self.assertTrue(incinerated, "killed before the first batch was marked")

        # The restarted daemon only finishes what was begun: nothing new is due.
        await store.set_retention("acme", raw=None)
        restarted = TwistdProcess(self.directory, *args, "--gc-interval", "0", env=self.env)
        restarted.start()
        self.addCleanup(restarted.stop)
        await poll(lambda: store.pending_purges(), lambda keys: not keys, 60, lambda keys: f"{len(keys)} blobs still queued")
        restarted.stop()
        stored = await stored_keys(blobs)
        statuses = {row["id"]: row["status"] for row in await store.list_messages(limit=self.COUNT)}
        self.assertEqual({i for i, status in statuses.items() if status == "incinerated"}, incinerated)
        for message_id, status in statuses.items():
            self.assertEqual(key_of[message_id] in stored, status == "parsed", (message_id, status))
        self.assertEqual(len(stored), self.COUNT - len(incinerated))
        if queued - {key_of[i] for i in statuses if statuses[i] == "parsed"}:
            self.assertIn('"event": "retention_purge"', restarted.log())


class KilledMidPassLocalDisk(KilledMidPass, unittest.TestCase):
    def open(self):
        self.directory = temp_dir(self)
        self.env = dict(os.environ, MAILINGEST_LOG_FORMAT="json")
        database = "sqlite:///" + os.path.join(self.directory, "m.db")
        storage = "file:" + os.path.join(self.directory, "blobs")
        store, blobs = open_store(database, MESSAGE_EVENTS), open_blobs(storage)
        self.addCleanup(store.close)
        self.addCleanup(blobs.close)
        return store, blobs, ("--database", database, "--storage", storage)

    async def watch_until_killed(self, daemon, blobs):
        """Killed the moment the first raw copy is gone: mid-batch, blobs of marked rows still there."""
        folder = os.path.join(self.directory, "blobs", "raw", "2024", "05", "01")

        def watch():
            deadline = time.monotonic() + 60
            while len(os.listdir(folder)) == self.COUNT and time.monotonic() < deadline:
                time.sleep(0.002)
            daemon.process.send_signal(signal.SIGKILL)
            return len(os.listdir(folder))

        def start():
            """The pass begins at start, perhaps before the daemon listens: watched from before, so killed wherever it is."""
            try:
                daemon.start()
            except RuntimeError:
                pass  # killed before it listened

        watching = threads.deferToThread(watch)
        await threads.deferToThread(start)
        left = await watching
        self.assertLess(left, self.COUNT, "the pass never began")


class KilledMidPassS3(KilledMidPass, unittest.TestCase):
    def open(self):
        moto = shared_server()
        self.directory = temp_dir(self)
        self.env = dict(os.environ, AWS_ACCESS_KEY_ID=moto.access_key, AWS_SECRET_ACCESS_KEY=moto.secret_key, MAILINGEST_LOG_FORMAT="json")
        database, storage = postgres.create_database(), f"s3://{moto.create_bucket()}/mail"
        store, blobs = open_store(database, MESSAGE_EVENTS), open_blobs(storage, moto.endpoint, None, self.env)
        self.addCleanup(store.close)
        self.addCleanup(blobs.close)
        return store, blobs, ("--database", database, "--storage", storage, "--s3-endpoint", moto.endpoint)

    async def watch_until_killed(self, daemon, blobs):
        """Killed once a batch's deletes have begun and not ended (a count that is no multiple of the batch)."""
        await threads.deferToThread(daemon.start)
        count = await poll(
            lambda: stored_keys(blobs), lambda keys: len(keys) % 100 != 0, 60, lambda keys: f"{len(keys)} blobs", interval=0.02
        )
        daemon.process.send_signal(signal.SIGKILL)
        self.assertLess(len(count), self.COUNT)


class TombstonesServed(ConsoleCase):
    """The API and the console show an incinerated message (and a retry of it is a duplicate); the admin erases."""

    async def incinerate(self, message_id: int) -> None:
        """A period of one second, passed: the daemon's own pass (as its retention service runs it) incinerates it."""
        await self.daemon.store.set_retention("acme", raw=1)
        with later(self.daemon.store, 1.1):
            done = await run_pass(self.daemon.store, self.daemon.blobs)
        self.assertEqual((done.messages, done.blobs), (1, 1))
        self.assertEqual((await self.daemon.store.get_message(message_id))["status"], "incinerated")

    async def test_api_and_console_show_incinerated_messages(self):
        sent = order("acme", 1)  # its MIME boundary is random: a retry is these very bytes
        code, reply = await self.daemon.send(sent, ["orders+acme@example.com"])
        message_id = int(reply.split()[-1])
        self.assertEqual((await self.daemon.settled(message_id))["status"], "parsed")
        stored = await stored_keys(self.daemon.blobs)
        self.assertEqual(len(stored), 2)  # the raw copy and the document
        await self.incinerate(message_id)
        self.assertEqual(stored - await stored_keys(self.daemon.blobs), {(await self.daemon.store.get_message(message_id))["raw_key"]})
        shown = await self.get_json(f"/v1/messages/{message_id}")
        self.assertEqual((shown["status"], shown["incinerated_reason"]), ("incinerated", "retention"))
        self.assertIsNotNone(shown["incinerated_at"])
        self.assertEqual(len(shown["documents"]), 1)  # documents keep their own period (forever here)
        gone = await self.get_json(f"/v1/messages/{message_id}/raw", status=410)
        self.assertEqual(gone["error"], "incinerated")
        self.assertIn("incinerated (retention)", gone["message"])
        listed = await self.get_json("/v1/messages?status=incinerated")
        self.assertEqual([m["id"] for m in listed["messages"]], [message_id])
        audit = await self.get_json("/v1/audit")
        self.assertEqual([(e["action"], e["message_id"]) for e in audit["entries"]], [("incinerate", message_id)])
        self.assertEqual((await self.get_json("/v1/audit", "beta"))["entries"], [])

        cookie = await self.sign_in("acme")
        response, page = await self.request("GET", f"/console/messages/{message_id}", cookie)
        self.assertEqual(response.code, 200, page)
        self.assertIn("was incinerated (retention)", page)
        self.assertNotIn("Download raw message", page)
        response, page = await self.request("GET", f"/console/messages/{message_id}/raw", cookie)
        self.assertEqual(response.code, 410)
        response, page = await self.request("GET", "/console/orgs/1/messages", cookie)
        self.assertEqual(response.code, 200)

        # a retry of the same message is a duplicate of the tombstone, not stored again
        code, reply = await self.daemon.send(sent, ["orders+acme@example.com"])
        self.assertEqual((code, int(reply.split()[-1])), (250, message_id))
        self.assertEqual(len(await stored_keys(self.daemon.blobs)), 1)  # its own raw copy went with the duplicate

    async def test_admin_erases_through_the_api_and_the_console(self):
        first = await self.deliver("acme", 1)
        second = await self.deliver("acme", 2)
        held = await self.deliver("acme", 3)
        await self.daemon.store.add_hold("acme", "dispute", "cli:test", message_id=held)
        code, _, body = await self.get(f"/v1/messages/{first}", "acme", method="DELETE")
        self.assertEqual((code, json.loads(body)["error"]), (403, "forbidden"))
        code, _, body = await self.get(f"/v1/messages/{held}", "admin", method="DELETE")
        self.assertEqual((code, json.loads(body)["error"]), (409, "held"))
        code, _, body = await self.get(f"/v1/messages/{first}", "admin", method="DELETE")
        self.assertEqual(code, 200, body)
        erased = json.loads(body)
        self.assertEqual((erased["status"], erased["incinerated_reason"], erased["envelope"]["from"]), ("incinerated", "erasure", ""))
        self.assertTrue(erased["documents"][0]["deleted_at"])
        document = erased["documents"][0]["id"]
        self.assertEqual((await self.get_json(f"/v1/documents/{document}/content", status=410))["error"], "deleted")
        code, _, body = await self.get(f"/v1/messages/{first}", "admin", method="DELETE")
        self.assertEqual((code, json.loads(body)["error"]), (409, "not_erasable"))

        cookie = await self.sign_in("admin")
        response, page = await self.request("GET", f"/console/messages/{second}/erase", cookie)
        self.assertEqual(response.code, 200)
        self.assertIn("deleted for good", page)
        self.assertEqual((await self.daemon.store.get_message(second))["status"], "parsed")  # asking changes nothing
        token = await self.csrf(cookie, f"/console/messages/{second}/erase")
        response, _ = await self.request("POST", f"/console/messages/{second}/erase", cookie, form={"csrf": token})
        self.assertEqual(response.code, 303)
        response, page = await self.request("GET", f"/console/messages/{second}", cookie)
        self.assertIn(f"Message {second} is erased", page)
        self.assertEqual((await self.daemon.store.get_message(second))["incinerated_reason"], "erasure")
        response, page = await self.request("GET", f"/console/messages/{held}/erase", cookie)
        token = await self.csrf(cookie, f"/console/messages/{held}/erase")
        await self.request("POST", f"/console/messages/{held}/erase", cookie, form={"csrf": token})
        response, page = await self.request("GET", f"/console/messages/{held}", cookie)
        self.assertIn("under a legal hold", page)
        self.assertEqual((await self.daemon.store.get_message(held))["status"], "parsed")
        actors = [(a["actor"], a["inbound_message_id"]) for a in await self.daemon.store.list_audit() if a["action"] == "erase"]
        self.assertEqual(actors, [("console: admin", second), ("api:admin", first)])


class ServiceTests(unittest.TestCase):
    async def test_a_pass_at_start_then_every_interval_one_log_event_per_batch(self):
        directory = temp_dir(self)
        store = open_store("sqlite:///" + os.path.join(directory, "m.db"), MESSAGE_EVENTS)
        blobs = open_blobs("file:" + os.path.join(directory, "blobs"))
        self.addCleanup(store.close)
        self.addCleanup(blobs.close)
        await store.migrate()
        keys = await populate(store, blobs, {"acme": ["a@x.test"] * 5}, documents=0)
        await store.set_retention("acme", raw=DAY)
        batches = []

        def observe(event):
            if event.get("event") == "retention_batch":
                batches.append(event["count"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        clock = task.Clock()
        service = RetentionService(store, blobs, 3600, batch=2, clock=clock)
        service.startService()
        self.addCleanup(service.stopService)
        await poll(lambda: store.count_messages("incinerated"), lambda n: n == 5, 10, str)
        await poll(lambda: batches, lambda found: len(found) == 3, 10, str)
        self.assertEqual(batches, [2, 2, 1])
        self.assertEqual(await stored_keys(blobs), set())
        more = await populate(store, blobs, {"acme": ["b@x.test"]}, documents=0, tag="-later")
        clock.advance(3599)
        self.assertEqual(len(batches), 3)
        clock.advance(1)
        await poll(lambda: batches, lambda found: len(found) == 4, 10, str)
        self.assertEqual(await stored_keys(blobs), set())
        self.assertEqual(await store.count_messages("incinerated"), len(keys) + len(more))


class SharedPostgresql(unittest.TestCase):
    async def test_daemons_sharing_a_database_share_the_work(self):
        """Two daemons' batches at once: each takes rows the other has not locked (FOR UPDATE SKIP LOCKED); none twice."""
        database = postgres.create_database()
        stores = [open_store(database, MESSAGE_EVENTS) for _ in range(2)]
        for store in stores:
            self.addCleanup(store.close)
        await stores[0].migrate()
        org = await stores[0].add_org("acme", "Acme")
        ids = await stores[0].insert_messages([message(org["id"], f"<{n}@x>") for n in range(200)])
        await defer.gatherResults([stores[0].mark_parsed(i, []) for i in ids])
        await stores[0].set_retention("acme", raw=DAY)
        taken = []
        while True:
            batches = await defer.gatherResults([store.incinerate_due(50) for store in stores])
            if not any(batches):
                break
            taken += [row["id"] for batch in batches for row in batch]
        self.assertEqual(sorted(taken), sorted(ids))
        audit = await stores[0].list_audit(limit=1000)
        self.assertEqual(sorted(a["inbound_message_id"] for a in audit if a["action"] == "incinerate"), sorted(ids))


class TombstonesServedOnPostgresqlAndS3(TombstonesServed):
    """The same, the daemon on PostgreSQL and S3 (moto)."""

    def setUp(self):
        moto = shared_server()
        self.extra = {"database": postgres.create_database(), "storage": f"s3://{moto.create_bucket()}/mail", "s3_endpoint": moto.endpoint}
        # The daemon's object storage reads its keys from the environment, as in production.
        for name, value in (("AWS_ACCESS_KEY_ID", moto.access_key), ("AWS_SECRET_ACCESS_KEY", moto.secret_key)):
            self.addCleanup(_restore_environ, name, os.environ.get(name))
            os.environ[name] = value
        return super().setUp()


def _restore_environ(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
