"""
The daemon's typed settings (L{mailingest.app.settings}): one frozen value
settled from the option table, checked once, and a daemon assembled from it
whose parts are given at construction.
"""

import dataclasses

from twisted.internet import defer
from twisted.trial import unittest

from mailingest.app import service
from mailingest.app.options import ALL_OPTIONS, STORAGE_OPTIONS
from mailingest.app import settings as settings_module
from mailingest.app.settings import Settings, StorageSettings
from mailingest.errors import ConfigError
from tests.daemon import RunningDaemon, settings_for, temp_dir


class SettingsTests(unittest.SynchronousTestCase):
    def test_fields_are_the_option_table(self):
        self.assertEqual([f.name for f in dataclasses.fields(StorageSettings)], [o.key for o in STORAGE_OPTIONS])
        self.assertEqual({f.name for f in dataclasses.fields(Settings)}, {o.key for o in ALL_OPTIONS})

    def test_frozen(self):
        settings = Settings.settle({"max_recipients": "7"}, environ={})
        self.assertEqual(settings.max_recipients, 7)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            settings.max_recipients = 8
        self.assertEqual(settings.max_recipients, 7)

    def test_repeatable_options_are_tuples(self):
        settings = Settings.settle({"domain": ["a.test", "b.test"]}, environ={})
        self.assertEqual(settings.domain, ("a.test", "b.test"))

    def test_hostname_defaults_to_this_machine(self):
        self.patch(settings_module, "default_hostname", lambda: "fqdn.test")
        self.assertEqual(Settings.settle({}, environ={}).hostname, "fqdn.test")
        self.assertEqual(Settings.settle({"hostname": "mx.test"}, environ={}).hostname, "mx.test")

    def test_options_that_go_together(self):
        with self.assertRaises(ConfigError) as raised:
            Settings.settle({"tls_cert": "cert.pem"}, environ={})
        self.assertIn("--tls-cert and --tls-key go together", str(raised.exception))
        with self.assertRaises(ConfigError) as raised:
            Settings.settle({}, environ={"MAILINGEST_SMTP": "haproxy:tcp:25"})
        self.assertIn("--proxy-trusted", str(raised.exception))
        settings = Settings.settle({"proxy_trusted": ["10.0.0.0/8"]}, environ={"MAILINGEST_SMTP": "haproxy:tcp:25"})
        self.assertEqual(settings.smtp, ("haproxy:tcp:25",))

    def test_an_unknown_or_missing_value_is_refused(self):
        values = dataclasses.asdict(Settings.settle({}, environ={}))
        self.assertEqual(Settings.from_values(values).processes, 1)
        with self.assertRaises(TypeError):
            Settings.from_values(dict(values, procesess=2))
        del values["processes"]
        with self.assertRaises(TypeError):
            Settings.from_values(values)

    def test_multi_process_mode(self):
        self.assertFalse(Settings.settle({}, environ={}).multi_process)
        self.assertTrue(Settings.settle({"processes": "2"}, environ={}).multi_process)

    def test_gc_floor(self):
        settings = Settings.settle({"store_timeout": "10", "extraction_lease": "20", "extraction_timeout": "30"}, environ={})
        self.assertEqual(settings.gc_floor, 60.0)


class DaemonPartsTests(unittest.TestCase):
    """Nothing is added to the daemon after it is built: what tests look into comes through its constructor."""

    def build(self, **overrides) -> tuple[RunningDaemon, list[str]]:
        late: list[str] = []

        class Watched(service.Daemon):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.__dict__["constructed"] = True

            def __setattr__(self, name, value):
                # Twisted's own state (running, parent) lives on the class; a new attribute does not.
                if self.__dict__.get("constructed") and name not in self.__dict__ and not hasattr(type(self), name):
                    late.append(name)
                super().__setattr__(name, value)

        self.patch(service, "Daemon", Watched)
        daemon = RunningDaemon(temp_dir(self), **overrides)
        self.assertIsInstance(daemon.service, Watched)
        return daemon, late

    @defer.inlineCallbacks
    def test_single_process(self):
        daemon, late = self.build(api="tcp:0:interface=127.0.0.1")
        yield daemon.start()
        self.addCleanup(daemon.stop)
        # (As DaemonTestCase does: a stop in the same turn as `ready` would cancel the start.)
        yield daemon.store.add_org("acme", "Acme Corp")
        self.assertEqual(late, [])
        self.assertIs(daemon.service.delivery, daemon.delivery)
        self.assertIsNotNone(daemon.delivery)
        self.assertEqual(len(daemon.service.smtp_listeners), 1)
        self.assertIsNotNone(daemon.service.api_listener.port)
        self.assertIsNone(daemon.service.ops_listener)
        self.assertIn(daemon.service.webhooks, list(daemon.service.serving))
        self.assertIn(daemon.service.extraction, list(daemon.service.serving))

    def test_multi_process_has_no_delivery_here(self):
        daemon, late = self.build(processes="2")
        self.addCleanup(daemon.service._close_storage)
        self.assertEqual(late, [])
        self.assertIsNone(daemon.service.delivery)
        self.assertEqual(daemon.service.smtp_listeners, [])
        self.assertIsNone(daemon.service.api_listener)

    def test_settings_for_is_typed(self):
        settings = settings_for(temp_dir(self), max_recipients="3")
        self.assertIsInstance(settings, Settings)
        self.assertEqual(settings.max_recipients, 3)
