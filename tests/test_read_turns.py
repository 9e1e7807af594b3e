"""
One organisation's reads wait for each other, not another organisation's
for them: L{OrgTurns}, and the read model's pages and searches taking their
turn (no database: the read itself is a Deferred the test fires).
"""

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.storage.engines.sqlite import SqliteEngine
from mailingest.storage.store import Store
from mailingest.storage.stores.reads import OrgTurns


class OrgTurnsTests(TestCase):
    def test_one_at_a_time_per_organisation_others_at_once(self):
        turns, started = OrgTurns(), []

        def read(name):
            started.append(name)
            return pending.setdefault(name, defer.Deferred())

        pending: dict[str, defer.Deferred] = {}
        a1, a2, b1 = turns.run(1, read, "a1"), turns.run(1, read, "a2"), turns.run(2, read, "b1")
        self.assertEqual(started, ["a1", "b1"])
        pending["b1"].callback("B")
        self.assertEqual(self.successResultOf(b1), "B")
        pending["a1"].errback(RuntimeError("a1 failed"))
        self.failureResultOf(a1, RuntimeError)
        self.assertEqual(started, ["a1", "b1", "a2"])
        self.assertEqual(len(turns), 1)
        pending["a2"].callback("A")
        self.assertEqual(self.successResultOf(a2), "A")
        self.assertEqual(len(turns), 0)


class ReadModelTurnsTests(TestCase):
    def setUp(self):
        engine = SqliteEngine(self.mktemp() + ".db")
        self.addCleanup(engine.close)
        self.store = Store(engine, MESSAGE_EVENTS)
        self.reads: list[tuple[str, tuple]] = []
        self.pending: list[defer.Deferred] = []

        def read(fn, *args):
            self.reads.append((fn.__name__, args[:1]))
            self.pending.append(defer.Deferred())
            return self.pending[-1]

        self.store._read = read

    def test_searches_and_pages_take_their_organisations_turn(self):
        first = self.store.search_messages(7, text="order for")
        self.store.page_messages(org_id=7)
        self.store.search_messages(8, text="order for")
        self.store.page_messages()  # every organisation's (the admin's): no turn
        self.assertEqual(self.reads, [("_search_messages", (7,)), ("_search_messages", (8,)), ("_page_messages", (None,))])
        self.pending[0].callback([])
        self.successResultOf(first)
        self.assertEqual(self.reads[-1], ("_page_messages", (7,)))
