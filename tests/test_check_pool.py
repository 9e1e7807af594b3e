"""
The sender check pool: at most C{per_org} checks of one organisation in the
check process at once, others' checks not held behind them, replies matched
by id in any order, and a process that dies fails only the checks it held.
"""

import json

from twisted.internet import defer, task
from twisted.trial import unittest

from mailingest.extraction.checks import CheckPool
from mailingest.extraction.pool import ParserDied, ParserError
from mailingest.verification.results import Check, Verdicts


class _ProcessTransport:
    """What the pool writes to the check process."""

    def __init__(self):
        self.lines: list[dict] = []
        self.pid = 4242
        self.killed = False

    def write(self, data: bytes) -> None:
        self.lines += [json.loads(line) for line in data.splitlines()]

    def signalProcess(self, name: str) -> None:
        self.killed = True


class _Reactor(task.Clock):
    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args, env):
        protocol.makeConnection(_ProcessTransport())
        self.spawned.append((protocol, args, env))


VERDICTS = Verdicts(spf=Check("pass", "x.example"), dkim=Check("none", None), dmarc=Check("none", None), arc=Check("none", None))


class CheckPoolTests(unittest.TestCase):
    def setUp(self):
        self.reactor = _Reactor()
        self.pool = CheckPool(size=3, per_org=2, timeout=30, reactor=self.reactor)

    def asked(self) -> list[str]:
        [(process, _, _)] = self.reactor.spawned
        return [line["verify"]["raw_path"] for line in process.transport.lines]

    def answer(self, raw_path: str, **reply) -> None:
        [(process, _, _)] = self.reactor.spawned
        [line] = [line for line in process.transport.lines if line["verify"]["raw_path"] == raw_path]
        process.outReceived(json.dumps({"id": line["id"], **reply}).encode() + b"\n")

    def check(self, org: str, raw_path: str):
        return self.pool.verify(org, {"raw_path": raw_path})

    async def test_one_organisation_does_not_hold_the_others(self):
        flood = [defer.ensureDeferred(self.check("acme", f"acme-{n}")) for n in range(4)]
        other = defer.ensureDeferred(self.check("globex", "globex-0"))
        self.assertEqual(self.asked(), ["acme-0", "acme-1", "globex-0"])
        self.answer("globex-0", verdicts=VERDICTS.as_dict(), text_body=True)
        checked = await other
        self.assertEqual((checked.verdicts.spf.result, checked.text_body), ("pass", True))
        self.assertEqual(self.asked(), ["acme-0", "acme-1", "globex-0"], "acme is at its 2")
        self.answer("acme-1", error="ValueError: bad")
        with self.assertRaises(ParserError):
            await flood[1]
        self.assertEqual(self.asked()[3:], ["acme-2"])
        self.assertFalse(flood[0].called)

    async def test_a_dead_process_fails_its_checks_and_is_replaced(self):
        held = defer.ensureDeferred(self.check("acme", "acme-0"))
        self.reactor.advance(31)
        [(process, args, env)] = self.reactor.spawned
        self.assertTrue(process.transport.killed)
        self.assertEqual(args[-2:], ["3", str(1024 * 1024 * 1024)])
        self.assertNotIn("MAILINGEST_DATABASE", env)
        process.processEnded(None)
        with self.assertRaises(ParserDied) as raised:
            await held
        self.assertIn("stopped after 30 s", str(raised.exception))
        again = defer.ensureDeferred(self.check("acme", "acme-1"))
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual([line["verify"]["raw_path"] for line in self.reactor.spawned[1][0].transport.lines], ["acme-1"])
        self.assertFalse(again.called)
