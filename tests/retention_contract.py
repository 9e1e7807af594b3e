"""
What the retention and legal hold roles must do on every engine (issue 26),
mixed into the store contract's TestCase of each engine (see C{test_store}).
"""

from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

from twisted.internet import task

from mailingest.errors import ContentGone, MessageHeld, NoSuchHold, NotErasable
from mailingest.interfaces import Duplicate
from tests.store_contract import message


@contextmanager
def later(store, seconds: float):
    """The store stamps and compares times as if C{seconds} had passed: a period passes without a sleep."""
    ahead = task.Clock()
    ahead.advance(store.clock.seconds() + seconds)
    store.clock, real = ahead, store.clock
    try:
        yield
    finally:
        store.clock = real

DAY = 86400


def recent(org_id: int, message_id: str, **fields) -> dict:
    """A message that arrived a minute ago (L{message}'s arrive in 2024)."""
    return message(org_id, message_id, received_at=datetime.now(timezone.utc) - timedelta(minutes=1), **fields)


def document(org_id: int, message_id: int, n: int = 0) -> dict:
    return {
        "org_id": org_id, "ordinal": n, "filename": f"PO {n} Jane Doe.pdf", "content_type": "application/pdf",
        "size": 10 + n, "sha256": f"{n:02d}" * 32, "storage_key": f"documents/{org_id}/{message_id}/{n}",
        "original_filename": f"PO {n} Jane Doe.pdf",
    }


class RetentionContract:
    async def parsed(self, org_id: int, rows: list[dict], documents: int = 0) -> list[int]:
        ids = await self.store.insert_messages(rows)
        for message_id in ids:
            await self.store.mark_parsed(message_id, [document(org_id, message_id, n) for n in range(documents)])
        return ids

    async def test_retention_incinerates_what_is_past_its_period_except_held_and_unsettled(self):
        acme, globex = await self.two_orgs()
        self.assertEqual(
            await self.store.set_retention("ACME", raw=DAY),
            {"id": acme, "slug": "acme", "retention_raw_seconds": DAY, "retention_documents_seconds": None},
        )
        old, held, fresh = await self.parsed(acme, [message(acme, "<old@x>"), message(acme, "<held@x>"), recent(acme, "<fresh@x>")])
        waiting, failed, quarantined = await self.store.insert_messages([message(acme, f"<{n}@x>") for n in ("w", "f", "q")])
        await self.store.mark_failed(failed, "unparseable", 1)
        await self.store.mark_quarantined(quarantined, "DMARC did not pass")
        [other] = await self.parsed(globex, [message(globex, "<old@x>", raw_key="raw/globex-old")])
        await self.store.set_webhook("acme", "https://app.example/hooks", "whsec_x")
        heard = []
        await self.store.on_event(lambda: heard.append(True))
        hold = await self.store.add_hold("acme", "dispute 42", "cli:tester", message_id=held)
        self.assertEqual((hold["scope"], hold["inbound_message_id"], hold["org_slug"]), ("message", held, "acme"))

        gone = await self.store.incinerate_due(10)
        self.assertEqual(gone, [{"id": old, "org_id": acme, "bytes": 123, "reason": "retention", "keys": ["raw/<old@x>"]}])
        row = await self.store.get_message(old)
        self.assertEqual((row["status"], row["incinerated_reason"]), ("incinerated", "retention"))
        self.assertIsNotNone(row["incinerated_at"])
        self.assertEqual((row["raw_sha256"], row["subject"], row["mail_from"]), ("ab" * 32, "order <old@x>", "buyer@example.net"))
        for kept in (held, fresh, waiting, failed, quarantined, other):
            self.assertNotEqual((await self.store.get_message(kept))["status"], "incinerated", kept)
        [audit, added] = await self.store.list_audit(org_id=acme)
        self.assertEqual(
            (audit["actor"], audit["action"], audit["inbound_message_id"], audit["reason"], audit["sha256"]),
            ("retention", "incinerate", old, "retention", "ab" * 32),
        )
        self.assertEqual((added["action"], added["hold_id"], added["actor"]), ("hold_add", hold["id"], "cli:tester"))
        self.assertEqual([c["status"] for c in await self.store.status_history(old)], ["received", "parsed", "incinerated"])
        events = await self.store.message_events(old)
        self.assertEqual([(e["event_type"], e["message_status"], e["message_error"]) for e in events][-1], ("message.incinerated", "incinerated", "retention"))
        self.assertTrue(heard)
        self.assertEqual(await self.store.pending_purges(), ["raw/<old@x>"])
        await self.store.purged(["raw/<old@x>"])
        self.assertEqual(await self.store.pending_purges(), [])
        self.assertEqual(await self.store.incinerate_due(10), [])

        await self.store.remove_hold(hold["id"], "cli:tester")
        with self.assertRaises(NoSuchHold):
            await self.store.remove_hold(hold["id"], "cli:tester")
        self.assertEqual([row["id"] for row in await self.store.incinerate_due(10)], [held])
        self.assertEqual([h["id"] for h in await self.store.list_holds(include_removed=True)], [hold["id"]])
        self.assertEqual(await self.store.list_holds(), [])

    async def test_sender_and_organisation_holds(self):
        acme, _ = await self.two_orgs()
        await self.store.set_retention("acme", raw=DAY)
        jane, john = await self.parsed(acme, [message(acme, "<j@x>", mail_from="Jane@Example.NET"), message(acme, "<k@x>", mail_from="john@example.net")])
        everything = await self.store.add_hold("acme", "audit 2025", "cli:t")
        self.assertEqual(await self.store.incinerate_due(10), [])
        await self.store.add_hold("acme", "claim of jane", "cli:t", sender="jane@example.net")
        await self.store.remove_hold(everything["id"], "cli:t")
        self.assertEqual([row["id"] for row in await self.store.incinerate_due(10)], [john])
        with self.assertRaises(MessageHeld):
            await self.store.erase_message(jane, "cli:t")
        self.assertEqual((await self.store.get_message(jane))["status"], "parsed")

    async def test_a_raw_copy_shared_by_organisations_goes_with_its_last_live_row(self):
        acme, globex = await self.two_orgs()
        [mine] = await self.parsed(acme, [message(acme, "<s@x>", raw_key="raw/shared")])
        [theirs] = await self.parsed(globex, [message(globex, "<s@x>", raw_key="raw/shared")])
        await self.store.set_retention("acme", raw=DAY)
        self.assertEqual(len(await self.store.incinerate_due(10)), 1)
        self.assertEqual(await self.store.pending_purges(), [])
        self.assertEqual(await self.store.referenced_keys(["raw/shared"]), {"raw/shared"})
        await self.store.set_retention("globex", raw=DAY)
        self.assertEqual([row["id"] for row in await self.store.incinerate_due(10)], [theirs])
        self.assertEqual(await self.store.pending_purges(), ["raw/shared"])
        self.assertEqual(await self.store.referenced_keys(["raw/shared"]), set())
        self.assertNotEqual(mine, theirs)

    async def test_a_retry_of_an_incinerated_message_is_a_duplicate(self):
        acme, _ = await self.two_orgs()
        [first] = await self.parsed(acme, [message(acme, "<r@x>", content_sha256="cd" * 32)])
        await self.store.set_retention("acme", raw=DAY)
        await self.store.incinerate_due(10)
        [again] = await self.store.insert_messages([message(acme, "<r@x>", content_sha256="cd" * 32, raw_key="raw/retry")])
        self.assertIsInstance(again, Duplicate)
        self.assertEqual(again, first)
        with self.assertRaises(ContentGone):
            await self.store.reprocess(first)

    async def test_documents_go_when_their_period_passes(self):
        acme, _ = await self.two_orgs()
        old, fresh_message = await self.parsed(acme, [message(acme, "<d@x>"), message(acme, "<e@x>")], documents=2)
        await self.store.set_retention("acme", documents=1)
        # documents are stamped when extracted: now; a period of one second makes them due.
        await self.store.add_hold("acme", "keep e", "cli:t", message_id=fresh_message)
        with later(self.store, 1.5):
            self.assertEqual(await self.store.delete_due_documents(10), (2, 21))
        documents = await self.store.list_documents(message_id=old)
        self.assertEqual([(d["deleted_reason"], d["filename"]) for d in documents], [("retention", "PO 0 Jane Doe.pdf"), ("retention", "PO 1 Jane Doe.pdf")])
        self.assertTrue(all(d["deleted_at"] for d in documents))
        self.assertTrue(all(d["deleted_at"] is None for d in await self.store.list_documents(message_id=fresh_message)))
        self.assertEqual(sorted(await self.store.pending_purges()), [f"documents/{acme}/{old}/0", f"documents/{acme}/{old}/1"])
        self.assertEqual((await self.store.get_message(old))["status"], "parsed")
        self.assertEqual(await self.store.referenced_keys([f"documents/{acme}/{old}/0"]), set())
        with self.assertRaises(ContentGone):
            await self.store.reprocess(old)
        self.assertEqual([a["action"] for a in await self.store.list_audit(message_id=old)], ["delete_document"] * 2)

    async def test_erasure_replaces_personal_fields_and_keeps_the_tombstone(self):
        acme, _ = await self.two_orgs()
        await self.store.set_webhook("acme", "https://app.example/hooks", "whsec_x")
        [erased, received] = await self.store.insert_messages([message(acme, "<p@x>"), message(acme, "<q@x>")])
        await self.store.mark_parsed(erased, [document(acme, erased, 0)])
        with self.assertRaises(NotErasable):
            await self.store.erase_message(received, "api:admin")
        row = await self.store.erase_message(erased, "api:admin")
        self.assertEqual((row["status"], row["incinerated_reason"], row["bytes"]), ("incinerated", "erasure", 133))
        self.assertEqual((row["mail_from"], row["subject"], row["raw_sha256"]), ("", None, "ab" * 32))
        self.assertTrue(row["source_message_id"].startswith("erased:"))
        [doc] = await self.store.list_documents(message_id=erased)
        self.assertEqual((doc["filename"], doc["original_filename"], doc["deleted_reason"]), ("erased", None, "erasure"))
        self.assertEqual(sorted(await self.store.pending_purges()), [f"documents/{acme}/{erased}/0", "raw/<p@x>"])
        with self.assertRaises(NotErasable):
            await self.store.erase_message(erased, "api:admin")
        events = [e["event_type"] for e in await self.store.message_events(erased)]
        self.assertEqual(events, ["message.parsed", "message.erased"])
        self.assertEqual(
            [(a["action"], a["actor"]) for a in await self.store.list_audit(message_id=erased)],
            [("erase", "api:admin"), ("delete_document", "api:admin")],
        )

    async def test_erasure_by_sender_takes_exactly_that_senders_messages_of_that_organisation(self):
        acme, globex = await self.two_orgs()
        jane = await self.parsed(acme, [message(acme, f"<j{n}@x>", mail_from="jane@example.net") for n in range(3)])
        [john] = await self.parsed(acme, [message(acme, "<k@x>", mail_from="john@example.net")])
        [elsewhere] = await self.parsed(globex, [message(globex, "<j@x>", mail_from="jane@example.net")])
        [waiting] = await self.store.insert_messages([message(acme, "<w@x>", mail_from="JANE@example.net")])
        await self.store.add_hold("acme", "case", "cli:t", message_id=jane[2])
        erased, refused = await self.store.erase_sender("acme", "Jane@Example.net", "cli:t", limit=1)
        self.assertEqual([row["id"] for row in erased], [jane[0]])
        self.assertEqual([row["id"] for row in refused], [jane[2], waiting])
        self.assertIn("legal hold", refused[0]["reason"])
        self.assertIn("still being processed", refused[1]["reason"])
        erased, _ = await self.store.erase_sender("acme", "jane@example.net", "cli:t", limit=1)
        self.assertEqual([row["id"] for row in erased], [jane[1]])
        self.assertEqual((await self.store.erase_sender("acme", "jane@example.net", "cli:t"))[0], [])
        for kept in (john, elsewhere, jane[2], waiting):
            self.assertNotEqual((await self.store.get_message(kept))["status"], "incinerated")
