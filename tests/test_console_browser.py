"""
The console in a real Chromium driven by Selenium, against a real daemon
in this process: Debian's chromium and chromium-driver (installed by
.ci/run). Without them the tests are skipped, except under CI=true, where
their absence is a failure. One browser serves the whole class; Selenium's
blocking calls run in a thread so the reactor keeps serving the pages.
"""

import atexit
import hashlib
import os
import shutil
import time
from email.message import EmailMessage

from twisted.internet import defer, reactor, task, threads

from tests.test_api import PDF
from tests.test_console import ConsoleCase

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
HOSTILE = '<script>window.pwned = 1; document.title = "pwned"; alert(1)</script>'
# No "/" (a filename's path is cut off on extraction), so the markup survives into the stored name.
HOSTILE_FILENAME = "<script>window.pwned = 2; alert(2)<script><img src=x onerror=alert(3)>.pdf"

try:
    import selenium  # noqa: F401

    MISSING = None if CHROMIUM and CHROMEDRIVER else "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
except ImportError:
    MISSING = "needs selenium (pip install -e '.[test]')"


class BrowserTests(ConsoleCase):
    driver = None
    downloads = None

    def setUp(self):
        if MISSING:
            if os.environ.get("CI") == "true":
                self.fail(f"browser tests cannot run under CI=true: {MISSING}")
            raise self.skipTest(MISSING)
        d = super().setUp()
        d.addCallback(lambda _: self.track_connections())
        return d

    def track_connections(self) -> None:
        """Chromium keeps its connections alive: they are cut before the daemon stops, so the reactor is left clean."""
        factory = self.daemon.service.api_listener.port.factory
        build, channels = factory.buildProtocol, []
        factory.buildProtocol = lambda addr: channels.append(build(addr)) or channels[-1]

        def cut():
            for channel in channels:
                transport = channel._channel.transport  # behind Twisted's HTTP/1 or HTTP/2 chooser
                if transport is not None:
                    transport.abortConnection()
            return task.deferLater(reactor, 0, lambda: None)

        self.addCleanup(cut)

    @classmethod
    def browser(cls):
        if cls.driver is None:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service

            cls.downloads = os.path.realpath(temp_dir_for_class())
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
                options.add_argument(argument)
            options.add_experimental_option(
                "prefs", {"download.default_directory": cls.downloads, "download.prompt_for_download": False}
            )
            cls.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
            cls.driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": cls.downloads})
            atexit.register(cls.driver.quit)
        return cls.driver

    def browse(self, fn, *args):
        """Run C{fn(driver, *args)} in a thread (Selenium blocks)."""
        return threads.deferToThread(fn, self.browser(), *args)

    def sign_in_as(self, driver, who: str) -> None:
        from selenium.webdriver.common.by import By

        driver.delete_all_cookies()
        driver.get(self.base + "/console/sign-in")
        driver.find_element(By.NAME, "token").send_keys(self.tokens[who])
        driver.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()
        heading(driver, "Organisations")

    @defer.inlineCallbacks
    def test_sign_in_see_open_download_reprocess_sign_out(self):
        from selenium.webdriver.common.by import By

        yield self.browse(self.sign_in_as, "admin")
        message_id = yield self.deliver("acme", 1)
        failed_id = yield self.deliver("acme", 2)
        yield self.daemon.store.mark_failed(failed_id, "the parser gave up", 3)
        acme = yield self.daemon.store.get_org("acme")

        def open_and_download(driver):
            loaded(driver, By.LINK_TEXT, "acme").click()
            heading(driver, "Messages of acme")
            loaded(driver, By.LINK_TEXT, "Order 1").click()
            _wait(driver, lambda d: d.current_url.endswith(f"/console/messages/{message_id}"))
            loaded(driver, By.LINK_TEXT, "order.pdf").click()
            path = os.path.join(self.downloads, "order.pdf")
            deadline = time.monotonic() + 15
            while not os.path.exists(path) or os.path.exists(path + ".crdownload"):
                assert time.monotonic() < deadline, os.listdir(self.downloads)
                time.sleep(0.05)
            time.sleep(0.1)
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()

        digest = yield self.browse(open_and_download)
        self.assertEqual(digest, hashlib.sha256(PDF).hexdigest())

        def reprocess(driver):
            driver.get(f"{self.base}/console/orgs/{acme['id']}/messages?status=failed")
            loaded(driver, By.LINK_TEXT, "Order 2").click()
            loaded(driver, By.LINK_TEXT, "Reprocess…").click()
            heading(driver, f"Reprocess message {failed_id}?")
            loaded(driver, By.XPATH, "//main//button[text()='Reprocess']").click()
            return loaded(driver, By.CLASS_NAME, "notice").text

        notice = yield self.browse(reprocess)
        self.assertIn("queued for reprocessing", notice)
        yield self.daemon.until(failed_id, lambda row: row["status"] == "parsed")

        def parsed_then_sign_out(driver):
            driver.refresh()
            status = driver.find_element(By.CSS_SELECTOR, "main .status").text
            driver.find_element(By.XPATH, "//button[text()='Sign out']").click()
            heading(driver, "Sign in")
            driver.get(self.base + "/console/orgs")
            return status, heading(driver)

        status, page = yield self.browse(parsed_then_sign_out)
        self.assertEqual(status, "parsed")
        self.assertEqual(page, "Sign in")

    @defer.inlineCallbacks
    def test_organisation_cannot_open_another_organisations_message(self):
        from selenium.webdriver.common.by import By

        message_id = yield self.deliver("acme", 1)

        def look(driver, who):
            self.sign_in_as(driver, who)
            driver.get(f"{self.base}/console/messages/{message_id}")
            return driver.find_element(By.TAG_NAME, "h1").text

        heading = yield self.browse(look, "beta")
        self.assertEqual(heading, "Not found")
        heading = yield self.browse(look, "acme")
        self.assertEqual(heading, "Order 1")

    @defer.inlineCallbacks
    def test_script_in_subject_and_filename_is_shown_not_run(self):
        from selenium.common.exceptions import NoAlertPresentException
        from selenium.webdriver.common.by import By

        msg = EmailMessage()
        msg["From"] = "buyer@customer.test"
        msg["To"] = "orders+acme@example.com"
        msg["Subject"] = HOSTILE
        msg["Message-ID"] = "<hostile@customer.test>"
        msg.set_content("see attached")
        msg.add_attachment(PDF, maintype="application", subtype="pdf", filename=HOSTILE_FILENAME)
        code, reply = yield self.daemon.send(msg.as_bytes().replace(b"\n", b"\r\n"), ["orders+acme@example.com"])
        self.assertEqual(code, 250, reply)
        message_id = int(reply.split()[-1])
        yield self.daemon.settled(message_id)
        documents = yield self.daemon.store.list_documents(message_id=message_id)
        self.assertTrue(documents)

        def look(driver):
            self.sign_in_as(driver, "acme")
            driver.get(f"{self.base}/console/messages/{message_id}")
            try:
                driver.switch_to.alert
                alerted = True
            except NoAlertPresentException:
                alerted = False
            return (
                alerted,
                driver.execute_script("return window.pwned === undefined ? null : window.pwned;"),
                driver.title,
                driver.find_element(By.TAG_NAME, "h1").text,
                driver.find_element(By.CSS_SELECTOR, "a[href$='/content']").text,
            )

        alerted, pwned, title, heading, link = yield self.browse(look)
        self.assertFalse(alerted)
        self.assertIsNone(pwned)
        self.assertNotEqual(title, "pwned")
        self.assertEqual(heading, HOSTILE)
        self.assertEqual(link, HOSTILE_FILENAME)
        self.assertEqual(documents[0]["filename"], HOSTILE_FILENAME)


def _wait(driver, until):
    """Wait up to 10 s for C{until(driver)}: after a click the old page may still be there, or be going."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    # While a page is replaced, an element lookup can fail in several ways
    # (no such element, stale element, a node no longer in the document).
    return WebDriverWait(driver, 10, ignored_exceptions=(WebDriverException,)).until(until)


def loaded(driver, by, value):
    """The element once the page holding it has loaded."""
    return _wait(driver, lambda d: d.find_element(by, value))


def heading(driver, expected: str | None = None) -> str:
    """The page's h1 once the page showing it has loaded (a click returns before the next page is there)."""
    from selenium.webdriver.common.by import By

    if expected is not None:
        _wait(driver, lambda d: d.find_element(By.TAG_NAME, "h1").text == expected)
    return _wait(driver, lambda d: d.find_element(By.TAG_NAME, "h1").text)


def temp_dir_for_class() -> str:
    import tempfile

    path = tempfile.mkdtemp(prefix="mailingest-downloads-")
    atexit.register(shutil.rmtree, path, True)
    return path
