"""
Content verdicts end to end: a daemon in this process scanning with a real
clamd and a real rspamd (L{tests.scanners}) after the 250; each
organisation's content policy; infected content withheld from the API, the
console and webhooks until an admin's C{release --allow-infected}; a
scanner that is down holding mail or passing it, and mail flowing again by
itself once it is back; the console showing an infected document.
"""

import json
import os
import time
from email.message import EmailMessage

from twisted.internet import defer, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailingest.handoff.events import new_secret
from mailingest.ops import metrics
from tests import scanners
from tests.daemon import mailingest_cli, poll, temp_dir
from tests.test_api import PDF
from tests.test_console import ConsoleCase
from tests.test_scanning import zipped
from tests.webhook_receiver import Receiver

# The screenshot is written where MAILINGEST_SCREENSHOT says (docs/console-infected.png was made so), else to a temporary file.
SCREENSHOT = os.environ.get("MAILINGEST_SCREENSHOT")


def order(n: int, attachments=(), body: str = "Please find our order attached; delivery by Friday.\n") -> bytes:
    mail = EmailMessage()
    mail["From"] = "Buyer <buyer@customer.test>"
    mail["To"] = "orders+acme@example.com"
    mail["Subject"] = f"Order {n}"
    mail["Message-ID"] = f"<order-{n}@customer.test>"
    mail["Date"] = "Sun, 06 Dec 2026 10:00:00 +0000"
    mail.set_content(body)
    for filename, maintype, subtype, data in attachments:
        mail.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return mail.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


PDF_PART = ("order.pdf", "application", "pdf", PDF)
EICAR_ZIP = ("order-details.zip", "application", "zip", zipped("invoice.com", scanners.EICAR))


def counted(counter, label: str) -> float:
    return counter.labels(label)._value.get()


class ContentCase(ConsoleCase):
    """
    A daemon with --clamd and --rspamd (C{clamd_endpoint}, a test's own, when
    set; C{scanning}: other daemon settings over these) and a webhook
    receiver for acme.
    """

    clamd_endpoint = None
    scanning: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.clamd = scanners.clamd()
        self.rspamd = scanners.rspamd()
        self.extra = {
            "clamd": self.clamd_endpoint or self.clamd.unix,
            "rspamd": self.rspamd.url,
            "scan_budget": "20",
            "max_attempts": "10",
            "webhook_allow_http": True,
            "webhook_allow_private": True,
            **self.scanning,
        }
        yield super().setUp()
        self.receiver = yield Receiver().start()
        self.addCleanup(self.receiver.stop)
        yield self.daemon.store.set_webhook("acme", self.receiver.url, new_secret())

    @defer.inlineCallbacks
    def deliver_order(self, text: bytes) -> dict:
        code, reply = yield self.daemon.send(text, ["orders+acme@example.com"])
        self.assertEqual(code, 250, reply)
        return (yield self.daemon.settled(int(reply.split()[-1]), timeout=60))

    def cli(self, *args: str) -> defer.Deferred:
        database = "--database=" + self.daemon.settings.database
        storage = "--storage=" + self.daemon.settings.storage
        return threads.deferToThread(mailingest_cli, self.directory, database, storage, *args)

    @defer.inlineCallbacks
    def webhook_bodies(self, count: int) -> list[dict]:
        yield poll(lambda: len(self.receiver.requests), lambda n: n >= count, 20, lambda n: f"{n} webhook(s), not {count}")
        return [json.loads(body) for _, body, _ in self.receiver.requests]


class ContentVerdictTests(ContentCase):
    timeout = 300  # rspamd's first start compiles its Hyperscan databases

    @defer.inlineCallbacks
    def test_eicar_in_a_zip_is_quarantined_withheld_and_released_only_with_allow_infected(self):
        infected_before = counted(metrics.VIRUS_VERDICTS, "infected")
        logged = []
        observer = lambda event: logged.append(event) if event.get("event") == "infected" else None  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        row = yield self.deliver_order(order(1, [PDF_PART, EICAR_ZIP]))
        self.assertEqual(row["status"], "quarantined")
        self.assertEqual(row["virus"], "infected")
        self.assertTrue(row["virus_detail"].startswith("Mailingest.Test.EICAR"), row["virus_detail"])
        self.assertIn("in order-details.zip", row["quarantine_reason"])
        self.assertEqual(counted(metrics.VIRUS_VERDICTS, "infected"), infected_before + 1)
        self.assertEqual([(e["message_id"], e["outcome"]) for e in logged], [(row["id"], "quarantined")])
        self.assertTrue(logged[0]["signature"].startswith("Mailingest.Test.EICAR"))
        documents = yield self.daemon.store.list_documents(message_id=row["id"])
        verdicts = {d["filename"]: d["virus"] for d in documents}
        self.assertEqual(verdicts, {"order.pdf": "clean", "order-details.zip": "infected"})
        zip_id = next(d["id"] for d in documents if d["virus"] == "infected")

        # No webhook hands over a document: the quarantine event carries none.
        bodies = yield self.webhook_bodies(1)
        self.assertEqual([b["type"] for b in bodies], ["message.quarantined"])
        self.assertEqual(bodies[0]["documents"], [])
        self.assertEqual(bodies[0]["message"]["virus"]["result"], "infected")

        # No download, through the API or the console.
        for who in ("acme", "admin"):
            status, _, body = yield self.get(f"/v1/documents/{zip_id}/content", who)
            self.assertEqual(status, 403, body)
            self.assertEqual(json.loads(body)["error"], "infected")
            status, _, _ = yield self.get(f"/v1/messages/{row['id']}/raw", who)
            self.assertEqual(status, 403)
        status, _, body = yield self.get(f"/v1/messages/{row['id']}", "acme")
        shown = json.loads(body)
        self.assertEqual(shown["virus"]["result"], "infected")
        self.assertEqual({d["filename"]: d["virus"]["result"] for d in shown["documents"]}, verdicts)
        cookie = yield self.sign_in("acme")
        response, page = yield self.request("GET", f"/console/documents/{zip_id}/content", cookie)
        self.assertEqual(response.code, 403)
        self.assertIn("Infected", page)
        self.assertNotIn(scanners.EICAR.decode(), page)
        response, page = yield self.request("GET", f"/console/messages/{row['id']}", cookie)
        self.assertIn("verdict virus-infected", page)

        # The admin command refuses a plain release, then lets it out with --allow-infected.
        refused = yield self.cli("release", str(row["id"]))
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn(b"--allow-infected", refused.stderr)
        shown = yield self.cli("messages", "show", "--json", str(row["id"]))
        self.assertEqual(json.loads(shown.stdout)["virus"], "infected")
        released = yield self.cli("release", "--allow-infected", str(row["id"]))
        self.assertEqual(released.returncode, 0, released.stderr)
        self.assertIn(f"message {row['id']}: its infected documents may be downloaded (Mailingest.Test.EICAR", released.stdout.decode())
        history = yield self.daemon.store.status_history(row["id"])
        self.assertIn("infected-allowed", [change["status"] for change in history])
        yield self.daemon.until(row["id"], lambda r: r["status"] == "parsed", 60)
        status, _, body = yield self.get(f"/v1/documents/{zip_id}/content", "acme")
        self.assertEqual(status, 200)
        # Still never in a webhook.
        bodies = yield self.webhook_bodies(2)
        self.assertEqual(bodies[1]["type"], "message.parsed")
        self.assertEqual([d["filename"] for d in bodies[1]["documents"]], ["order.pdf"])

    @defer.inlineCallbacks
    def test_clean_order_passes_with_its_score(self):
        row = yield self.deliver_order(order(2, [PDF_PART]))
        self.assertEqual((row["status"], row["virus"], row["virus_detail"]), ("parsed", "clean", None))
        self.assertIsNotNone(row["spam_score"])
        self.assertNotIn(row["spam_action"], ("error", "reject"))
        self.assertIsNone(row["unscanned"])
        bodies = yield self.webhook_bodies(1)
        self.assertEqual(bodies[0]["documents"][0]["virus"], {"result": "clean", "detail": None})
        self.assertEqual(bodies[0]["message"]["spam"]["score"], row["spam_score"])
        shown = yield self.cli("messages", "show", str(row["id"]))
        self.assertIn(b"spam_score:", shown.stdout)
        self.assertIn(b"virus:", shown.stdout)

    @defer.inlineCallbacks
    def test_gtube_is_quarantined_above_the_threshold(self):
        set_policy = yield self.cli("org", "policy", "acme", "--spam-threshold", "10")
        self.assertIn(b"spam threshold: 10", set_policy.stdout)
        row = yield self.deliver_order(order(3, [PDF_PART], body="Cheap " + scanners.GTUBE.decode() + "\n"))
        self.assertEqual(row["status"], "quarantined")
        self.assertEqual(row["spam_action"], "reject")
        self.assertGreaterEqual(row["spam_score"], 15)
        self.assertIn("spam: score", row["quarantine_reason"])
        self.assertEqual(row["virus"], "clean")

    @defer.inlineCallbacks
    def test_reject_documents_drops_only_the_infected_one(self):
        yield self.daemon.store.set_content_policy("acme", on_virus="reject-documents")
        row = yield self.deliver_order(order(4, [PDF_PART, EICAR_ZIP]))
        self.assertEqual((row["status"], row["virus"]), ("parsed", "infected"))
        documents = yield self.daemon.store.list_documents(message_id=row["id"])
        self.assertEqual([d["filename"] for d in documents], ["order.pdf"])
        self.assertIn("order-details.zip: rejected, infected", row["warnings"])


class ScannerDownTests(ContentCase):
    """clamd at a socket path where nothing listens yet; a link to the real one brings it back."""

    timeout = 300

    def setUp(self):
        self.link = os.path.join(temp_dir(self), "clamd.sock")
        self.clamd_endpoint = "unix:" + self.link
        return super().setUp()

    @defer.inlineCallbacks
    def test_hold_then_recovers_by_itself(self):
        code, reply = yield self.daemon.send(order(5, [PDF_PART]), ["orders+acme@example.com"])
        message_id = int(reply.split()[-1])
        held = yield self.daemon.until(message_id, lambda r: (r["last_error"] or "").startswith("ScannerUnavailable"), 30)
        self.assertEqual(held["status"], "received")
        self.assertIn("cannot connect to clamd", held["last_error"])
        os.symlink(self.clamd.socket, self.link)
        started = time.monotonic()
        row = yield self.daemon.until(message_id, lambda r: r["status"] != "received", 60)
        self.assertEqual((row["status"], row["virus"]), ("parsed", "clean"))
        self.assertLess(time.monotonic() - started, 40)

    @defer.inlineCallbacks
    def test_pass_marks_it_unscanned(self):
        yield self.daemon.store.set_content_policy("acme", unscanned="pass")
        row = yield self.deliver_order(order(6, [PDF_PART]))
        self.assertEqual((row["status"], row["virus"]), ("parsed", "error"))
        self.assertIn("cannot connect to clamd", row["unscanned"])
        documents = yield self.daemon.store.list_documents(message_id=row["id"])
        self.assertEqual(documents[0]["virus"], "error")


class InfectedConsoleBrowserTests(ContentCase):
    """The console in Chromium (as L{tests.test_console_browser}), showing an infected document (docs/console-infected.png)."""

    timeout = 300

    def setUp(self):
        from tests.test_console_browser import MISSING

        if MISSING:
            if os.environ.get("CI") == "true":
                self.fail(f"browser tests cannot run under CI=true: {MISSING}")
            raise unittest.SkipTest(MISSING)
        from tests.test_console_browser import BrowserTests

        return super().setUp().addCallback(lambda _: BrowserTests.track_connections(self))

    @defer.inlineCallbacks
    def test_infected_document_badge(self):
        from selenium.webdriver.common.by import By

        from tests.test_console_browser import BrowserTests, loaded

        screenshot = SCREENSHOT or os.path.join(temp_dir(self), "console-infected.png")
        row = yield self.deliver_order(order(7, [PDF_PART, EICAR_ZIP]))
        self.assertEqual(row["status"], "quarantined")

        def look(driver):
            BrowserTests.sign_in_as(self, driver, "acme")
            driver.get(f"{self.base}/console/messages/{row['id']}")
            badges = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".verdict.virus-infected")]
            links = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "a[href$='/content']")]
            loaded(driver, By.CSS_SELECTOR, ".verdict.virus-infected")
            driver.set_window_size(1000, 2000)
            driver.save_screenshot(screenshot)
            driver.set_window_size(1000, 900)
            return badges, links

        badges, links = yield threads.deferToThread(look, BrowserTests.browser())
        self.assertEqual(len(badges), 2, badges)  # the message's and the zip's
        self.assertTrue(all("Mailingest.Test.EICAR" in badge for badge in badges), badges)
        self.assertEqual(links, ["order.pdf"], "the infected document has no download link")
        self.assertGreater(os.path.getsize(screenshot), 10000)

    @defer.inlineCallbacks
    def test_admin_releases_infected_content_after_ticking_the_box(self):
        from selenium.webdriver.common.by import By

        from tests.test_console_browser import BrowserTests, heading, loaded

        row = yield self.deliver_order(order(8, [PDF_PART, EICAR_ZIP]))
        self.assertEqual(row["status"], "quarantined")

        def release(driver):
            BrowserTests.sign_in_as(self, driver, "admin")
            driver.get(f"{self.base}/console/messages/{row['id']}")
            loaded(driver, By.LINK_TEXT, "Release infected content…").click()
            heading(driver, f"Release infected content message {row['id']}?")
            button = driver.find_element(By.XPATH, "//main//button[text()='Release infected content']")
            button.click()  # the box not ticked: the browser does not send the form
            refused = driver.find_element(By.NAME, "consent").get_property("validity")["valueMissing"]
            driver.find_element(By.NAME, "consent").click()
            button.click()
            notice = loaded(driver, By.CLASS_NAME, "notice").text
            return refused, notice

        refused, notice = yield threads.deferToThread(release, BrowserTests.browser())
        self.assertTrue(refused)
        self.assertIn("its infected documents may be downloaded (Mailingest.Test.EICAR", notice)
        history = yield self.daemon.store.status_history(row["id"])
        self.assertEqual([change["status"] for change in history].count("infected-allowed"), 1)
        yield self.daemon.until(row["id"], lambda r: r["status"] == "parsed", 60)

        def links(driver):
            driver.refresh()
            return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "a[href$='/content']")]

        self.assertEqual(sorted((yield threads.deferToThread(links, BrowserTests.browser()))), ["order-details.zip", "order.pdf"])
