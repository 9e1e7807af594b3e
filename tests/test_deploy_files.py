"""
The deployment files of SPEC section 8 (systemd unit, example config,
Dockerfile, docker-compose.yml) are consistent with the code and with the
tools that read them.
"""

import configparser
import os
import re
import shlex
import shutil
import stat
import subprocess

from twisted.trial import unittest

from mailingest.app.options import ALL_OPTIONS, read_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETC = os.path.join(REPO, "etc")
TWISTD = "/opt/mailingest/bin/twistd"

try:
    import yaml
except ImportError:
    yaml = None


def read(*path):
    with open(os.path.join(REPO, *path), encoding="utf-8") as f:
        return f.read()


def directives(unit_text):
    """Every Key=value of a unit file, values of repeated keys in order."""
    found = {}
    for line in unit_text.splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


class SystemdUnitTests(unittest.TestCase):
    def test_settings(self):
        unit = directives(read("etc", "mailingest.service"))
        self.assertEqual(
            shlex.split(unit["ExecStart"][0]),
            [TWISTD, "--nodaemon", "--pidfile=", "mailingest", "--config", "/etc/mailingest/mailingest.ini"],
        )
        expected = {
            "Restart": "always",
            "RestartSec": "2",
            "User": "mailingest",
            "Group": "mailingest",
            "WorkingDirectory": "/var/lib/mailingest",
            "StateDirectory": "mailingest",
            "ReadWritePaths": "/var/lib/mailingest",
            "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
            "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "KillSignal": "SIGTERM",
            "TimeoutStopSec": "20",
            "LimitNOFILE": "65536",
            "EnvironmentFile": "-/etc/mailingest/mailingest.env",
            "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        }
        self.assertEqual({key: unit[key][0] for key in expected}, expected)
        self.assertIn("@system-service", unit["SystemCallFilter"])

    def test_systemd_analyze_verify(self):
        """
        verify refuses a non-executable ExecStart, so the unit is checked from a
        copy whose ExecStart is a stand-in script.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        stand_in = os.path.join(directory, "twistd")
        with open(stand_in, "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(stand_in, stat.S_IRWXU)
        service = read("etc", "mailingest.service")
        self.assertIn("ExecStart=" + TWISTD + " ", service)
        with open(os.path.join(directory, "mailingest.service"), "w") as f:
            f.write(service.replace("ExecStart=" + TWISTD, "ExecStart=" + stand_in))
        shutil.copy(os.path.join(ETC, "mailingest.socket"), directory)
        units = [os.path.join(directory, name) for name in ("mailingest.service", "mailingest.socket")]
        result = subprocess.run(
            [analyze, "verify", *units], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("mailingest.s", result.stderr)

    def test_socket(self):
        unit = directives(read("etc", "mailingest.socket"))
        self.assertEqual(unit["ListenStream"], ["25"])
        self.assertIn("systemd:domain=INET6:index=0", read("etc", "mailingest.socket"))


class ExampleConfigTests(unittest.TestCase):
    path = os.path.join(ETC, "mailingest.ini.example")

    def test_parses(self):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(self.path, encoding="utf-8")
        self.assertEqual(parser.sections(), ["mailingest"])
        section = read_config_file(self.path)
        self.assertEqual(section["smtp"], "tcp:25")
        self.assertEqual(section["domain"], "ingest.example.com")
        self.assertEqual(section["database"], "sqlite:////var/lib/mailingest/mailingest.db")

    def test_every_option_and_nothing_else(self):
        keys = set()
        for line in read("etc", "mailingest.ini.example").splitlines():
            match = re.match(r"^#?\s*([a-z0-9-]+)\s*=", line)
            if match:
                keys.add(match.group(1))
        self.assertEqual(keys, {option.name for option in ALL_OPTIONS})

    def test_no_secret_values(self):
        for line in read("etc", "mailingest.ini.example").splitlines():
            self.assertNotRegex(line, r"^\s*database\s*=\s*postgresql://[^@]*:[^@]*@")


class DockerTests(unittest.TestCase):
    def instructions(self):
        """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
        text = re.sub(r"\\\n", " ", read("Dockerfile"))
        lines = [line.strip() for line in text.splitlines()]
        return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]

    def test_copy_sources_exist(self):
        copies = [args for instruction, args in self.instructions() if instruction == "COPY"]
        self.assertTrue(copies)
        for args in copies:
            *sources, _ = args.split()
            for source in sources:
                self.assertFalse(source.startswith("--"), "COPY --from or flags are not expected")
                self.assertTrue(os.path.exists(os.path.join(REPO, source)), source)

    def test_image(self):
        instructions = dict(self.instructions())
        self.assertEqual(instructions["FROM"], "python:3.11-slim")
        self.assertEqual(instructions["USER"], "mailingest")
        self.assertEqual(instructions["ENTRYPOINT"], '["twistd", "--nodaemon", "--pidfile=", "mailingest"]')
        self.assertIn("/healthz", instructions["HEALTHCHECK"])
        self.assertNotIn("curl", instructions["HEALTHCHECK"])
        self.assertEqual(set(instructions["EXPOSE"].split()), {"25", "8025"})
        self.assertEqual(instructions["VOLUME"], "/var/lib/mailingest")
        self.assertIn("getPlugins(IPlugin)", read("Dockerfile"))

    def test_dockerignore(self):
        ignored = read(".dockerignore").splitlines()
        for pattern in (".git", "**/__pycache__", "**/dropin.cache", "venv", ".venv", "mailingest-data"):
            self.assertIn(pattern, ignored)
        for needed in ("setup.cfg", "pyproject.toml", "README.md", "mailingest", "twisted"):
            self.assertNotIn(needed, ignored)

    def test_compose(self):
        text = read("docker-compose.yml")
        if yaml is None:
            for expected in ('"25:25"', '"127.0.0.1:8025:8025"', "image: postgres:16", "image: minio/minio",
                             "image: minio/mc", "pg_isready", "service_healthy", "restart: always"):
                self.assertIn(expected, text)
            return
        services = yaml.safe_load(text)["services"]
        self.assertEqual(set(services), {"mailingest", "postgres", "minio", "minio-init", "clamav", "rspamd"})
        daemon = services["mailingest"]
        self.assertEqual(daemon["build"], ".")
        self.assertEqual(daemon["restart"], "always")
        self.assertEqual(daemon["ports"], ["25:25", "127.0.0.1:8025:8025"])
        environment = daemon["environment"]
        self.assertTrue(environment["MAILINGEST_DATABASE"].startswith("postgresql://mailingest:"))
        self.assertTrue(environment["MAILINGEST_DATABASE"].endswith("@postgres:5432/mailingest"))
        self.assertEqual(environment["MAILINGEST_STORAGE"], "s3://mailingest/raw")
        self.assertEqual(environment["MAILINGEST_S3_ENDPOINT"], "http://minio:9000")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MAILINGEST_DOMAIN"):
            self.assertIn(name, environment)
        self.assertEqual(
            daemon["depends_on"],
            {
                "postgres": {"condition": "service_healthy"},
                "minio": {"condition": "service_healthy"},
                "minio-init": {"condition": "service_completed_successfully"},
            },
        )
        self.assertEqual(services["postgres"]["image"], "postgres:16")
        self.assertIn("pg_isready", services["postgres"]["healthcheck"]["test"][1])
        self.assertEqual(services["minio"]["command"], ["server", "/data"])
        self.assertIn("healthcheck", services["minio"])
        self.assertEqual(services["minio-init"]["image"], "minio/mc")
        self.assertIn("mc mb --ignore-existing store/mailingest", services["minio-init"]["command"][0])
        # The scanners, wired to the daemon (which does not wait for them: see README "Malware and spam").
        self.assertEqual(environment["MAILINGEST_CLAMD"], "tcp:clamav:3310")
        self.assertEqual(environment["MAILINGEST_RSPAMD"], "http://rspamd:11333")
        self.assertTrue(services["clamav"]["image"].startswith("clamav/clamav"))
        self.assertTrue(services["rspamd"]["image"].startswith("rspamd/rspamd"))
        for mount in services["rspamd"]["volumes"][:2]:
            self.assertTrue(os.path.exists(os.path.join(REPO, mount.split(":")[0])), mount)


class PackagingTests(unittest.TestCase):
    def test_every_package_is_installed(self):
        """A plain `pip install .` takes only the packages setup.cfg lists: a new folder must be listed."""
        config = configparser.ConfigParser()
        config.read(os.path.join(REPO, "setup.cfg"))
        listed = set(config["options"]["packages"].split())
        found = {
            os.path.relpath(directory, REPO).replace(os.sep, ".")
            for directory, _, files in os.walk(os.path.join(REPO, "mailingest"))
            if "__init__.py" in files
        }
        self.assertIn("mailingest.storage.engines", found)
        self.assertEqual(found - listed, set())
