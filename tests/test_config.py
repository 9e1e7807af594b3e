"""Where option values come from: command line, environment, config file, default."""

import os

from twisted.python import usage
from twisted.trial import unittest

from mailingest.app.options import ALL_OPTIONS, resolve
from mailingest.app.settings import Settings
from mailingest.errors import ConfigError
from mailingest.app.tap import Options
from tests.daemon import temp_dir


def write(directory: str, text: str) -> str:
    path = os.path.join(directory, "mailingest.ini")
    with open(path, "w") as f:
        f.write(text)
    return path


class PrecedenceTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.directory = temp_dir(self)
        self.ini = write(
            self.directory,
            "[mailingest]\nmax-recipients = 7\ntimeout = 30\ndomain = a.test, b.test\nmax_attempts = 9\n",
        )

    def test_defaults(self):
        settings = Settings.settle({}, environ={})
        self.assertEqual(settings.smtp, ("tcp:2525",))
        self.assertEqual(settings.http, "tcp:8025:interface=127.0.0.1")
        self.assertEqual(settings.database, "sqlite:///mailingest-data/mailingest.db")
        self.assertEqual(settings.storage, "file:mailingest-data/blobs")
        self.assertEqual(settings.domain, ("localhost",))
        self.assertEqual(settings.max_message_size, 52428800)
        self.assertEqual(settings.max_recipients, 100)
        self.assertEqual((settings.max_connections, settings.max_connections_per_ip), (1000, 50))
        self.assertEqual(settings.timeout, 300)
        self.assertEqual((settings.poll_interval, settings.max_attempts), (1, 5))

    def test_file_beats_default(self):
        settings = Settings.settle({}, environ={}, config_path=self.ini)
        self.assertEqual(settings.max_recipients, 7)
        self.assertEqual(settings.domain, ("a.test", "b.test"))
        self.assertEqual(settings.max_attempts, 9)

    def test_environment_beats_file(self):
        environ = {"MAILINGEST_MAX_RECIPIENTS": "8", "MAILINGEST_DOMAIN": "c.test d.test"}
        settings = Settings.settle({}, environ=environ, config_path=self.ini)
        self.assertEqual(settings.max_recipients, 8)
        self.assertEqual(settings.domain, ("c.test", "d.test"))
        self.assertEqual(settings.timeout, 30)

    def test_command_line_beats_environment(self):
        environ = {"MAILINGEST_MAX_RECIPIENTS": "8"}
        given = {"max_recipients": "9", "domain": ["e.test"]}
        settings = Settings.settle(given, environ=environ, config_path=self.ini)
        self.assertEqual(settings.max_recipients, 9)
        self.assertEqual(settings.domain, ("e.test",))

    def test_config_file_from_environment(self):
        settings = Settings.settle({}, environ={"MAILINGEST_CONFIG": self.ini})
        self.assertEqual(settings.max_recipients, 7)

    def test_bad_values_are_named(self):
        with self.assertRaises(ConfigError) as e:
            resolve(ALL_OPTIONS, {}, environ={"MAILINGEST_MAX_RECIPIENTS": "lots"})
        self.assertIn("MAILINGEST_MAX_RECIPIENTS", str(e.exception))
        with self.assertRaises(ConfigError) as e:
            resolve(ALL_OPTIONS, {"timeout": "-1"}, environ={})
        self.assertIn("--timeout", str(e.exception))

    def test_counts_and_seconds_say_what_is_wrong_in_our_words(self):
        """The daemon's options and the admin command's arguments share these validators."""
        for value, reason in (("lots", "not a number"), ("0", "must be at least 1")):
            with self.assertRaises(ConfigError) as e:
                resolve(ALL_OPTIONS, {"max_recipients": value}, environ={})
            self.assertEqual(str(e.exception), f"--max-recipients: invalid value {value!r} ({reason})")
        for value, reason in (("soon", "not a number"), ("0", "must be greater than 0")):
            with self.assertRaises(ConfigError) as e:
                resolve(ALL_OPTIONS, {"timeout": value}, environ={})
            self.assertEqual(str(e.exception), f"--timeout: invalid value {value!r} ({reason})")

    def test_worker_memory_limit(self):
        self.assertEqual(Settings.settle({}, environ={}).extraction_memory_limit, 1 << 30)
        environ = {"MAILINGEST_EXTRACTION_MEMORY_LIMIT": str(256 << 20)}
        self.assertEqual(Settings.settle({}, environ=environ).extraction_memory_limit, 256 << 20)
        with self.assertRaises(ConfigError) as e:
            resolve(ALL_OPTIONS, {"extraction_memory_limit": "1000"}, environ={})
        self.assertIn("--extraction-memory-limit", str(e.exception))
        self.assertIn("at least 67108864 (64 MiB)", str(e.exception))

    def test_public_url(self):
        """--api-public-url: a scheme, host and port; anything a link or the cookies' Secure flag could go wrong on is refused."""
        for text, value in (
            ("https://Mail.Example.com/", "https://mail.example.com"),
            ("http://127.0.0.1:8026", "http://127.0.0.1:8026"),
            ("https://[2001:db8::1]:8443", "https://[2001:db8::1]:8443"),
        ):
            self.assertEqual(Settings.settle({"api_public_url": text}, environ={}).api_public_url, value)
        environ = {"MAILINGEST_API_PUBLIC_URL": "https://mail.example.com"}
        self.assertEqual(Settings.settle({}, environ=environ).api_public_url, "https://mail.example.com")
        for text, reason in (
            ("mail.example.com", "must start with https://"),
            ("ftp://mail.example.com", "must start with https://"),
            ("https://mail.example.com/api/", "only a scheme, a host and an optional port"),
            ("https://mail.example.com?x=1", "only a scheme, a host and an optional port"),
            ("https://mail.example.com#top", "only a scheme, a host and an optional port"),
            ("https://user@mail.example.com", "only a scheme, a host and an optional port"),
            ("https://mail.example.com:99999", "not a URL"),
            ("https://", "bad host"),
            ("https://mail_example.com", "bad host"),
            ("https://[v1.x]", "bad host"),
            ("https://mail.example.com\r\nX-Evil: 1", "without spaces or control characters"),
            ("https://b\u00fccher.de", "xn--"),
        ):
            with self.assertRaises(ConfigError, msg=text) as e:
                resolve(ALL_OPTIONS, {"api_public_url": text}, environ={})
            self.assertIn("--api-public-url: invalid value", str(e.exception))
            self.assertIn(reason, str(e.exception))

    def test_secret_values_are_not_echoed(self):
        bad = write(self.directory, "[mailingest]\nlog-format = xml\n")
        with self.assertRaises(ConfigError):
            resolve(ALL_OPTIONS, {}, environ={}, config_path=bad)

    def test_config_file_errors(self):
        for text, expected in (
            ("[other]\nx = 1\n", "no [mailingest] section"),
            ("[mailingest]\nno-such-option = 1\n", "unknown option"),
            ("not ini at all", "bad config file"),
        ):
            with self.assertRaises(ConfigError) as e:
                resolve(ALL_OPTIONS, {}, environ={}, config_path=write(self.directory, text))
            self.assertIn(expected, str(e.exception))
        with self.assertRaises(ConfigError) as e:
            resolve(ALL_OPTIONS, {}, environ={}, config_path=os.path.join(self.directory, "missing.ini"))
        self.assertIn("cannot read config file", str(e.exception))


class PluginOptionsTests(unittest.SynchronousTestCase):
    def test_help_lists_every_option(self):
        text = str(Options())
        for option in ALL_OPTIONS:
            self.assertIn("--" + option.name, text)
        self.assertIn("--config", text)

    def test_repeatable_options(self):
        options = Options()
        options.parseOptions(["--smtp", "tcp:25", "--smtp", "tcp6:25", "--domain", "a.test", "--domain", "b.test"])
        self.assertEqual(options.settings.smtp, ("tcp:25", "tcp6:25"))
        self.assertEqual(options.settings.domain, ("a.test", "b.test"))

    def test_proxy_trusted_networks(self):
        options = Options()
        options.parseOptions(["--proxy-trusted", "10.0.0.0/8,192.0.2.7", "--proxy-trusted", "2001:db8::/32"])
        self.assertEqual(
            [str(network) for network in options.settings.proxy_trusted],
            ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"],
        )
        settings = Settings.settle({}, environ={"MAILINGEST_PROXY_TRUSTED": "10.0.0.0/8, 172.16.0.0/12"})
        self.assertEqual([str(network) for network in settings.proxy_trusted], ["10.0.0.0/8", "172.16.0.0/12"])

    def test_usage_errors(self):
        for argv in (
            ["--max-recipients", "0"],
            ["--tls-cert", "x.pem"],
            ["--log-format", "xml"],
            ["--proxy-trusted", "10.0.0.1/8"],
            ["--proxy-trusted", "lb.example"],
        ):
            self.assertRaises(usage.UsageError, Options().parseOptions, argv)
