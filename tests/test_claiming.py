"""
The claim loop the extraction service and the webhook sender share: workers per
free slot, claiming until empty, a wake during a claim honoured, a failed
claim reported.
"""

from twisted.internet import defer, task
from twisted.trial import unittest

from mailingest.claiming import ClaimWorkers


class ClaimWorkersTests(unittest.TestCase):
    def make(self, slots=("a", "b")):
        self.running = True
        self.claims: list[defer.Deferred] = []
        self.handled: list[tuple] = []
        self.failures: list[Exception] = []

        def claim():
            d = defer.Deferred()
            self.claims.append(d)
            return d

        async def handle(batch, slot):
            self.handled.append((batch, slot))

        return ClaimWorkers(list(slots), claim, handle, self.failures.append, lambda: self.running)

    def test_a_worker_per_free_slot_until_a_claim_is_empty(self):
        workers = self.make()
        workers.wake()
        self.assertEqual(len(self.claims), 2)
        self.claims[0].callback([1, 2])
        self.assertEqual(self.handled, [([1, 2], "b")])
        self.assertEqual(len(self.claims), 3, "it claims again after a batch")
        for d in self.claims[1:]:
            d.callback([])
        self.assertEqual(len(self.claims), 3)
        workers.wake()
        self.assertEqual(len(self.claims), 5, "the slots are free again")

    def test_a_wake_during_a_claim_makes_it_look_once_more(self):
        workers = self.make(slots=["only"])
        workers.wake()
        workers.wake()  # no free slot; work was written meanwhile
        self.assertEqual(len(self.claims), 1)
        self.claims[0].callback([])
        self.assertEqual(len(self.claims), 2)
        self.claims[1].callback([])
        self.assertEqual(len(self.claims), 2)

    def test_a_failed_claim_is_reported_and_ends_its_worker(self):
        workers = self.make(slots=["only"])
        workers.wake()
        self.claims[0].errback(RuntimeError("database gone"))
        self.assertEqual([str(e) for e in self.failures], ["database gone"])
        self.assertEqual(len(self.claims), 1)
        workers.wake()
        self.assertEqual(len(self.claims), 2)

    def test_nothing_is_claimed_when_not_running(self):
        workers = self.make()
        self.running = False
        workers.wake()
        self.assertEqual(self.claims, [])

    def test_in_hand_waits_for_the_batches_or_the_timeout(self):
        clock = task.Clock()
        workers = self.make(slots=["only"])
        workers.wake()
        done = []
        workers.in_hand(5, clock).addCallback(done.append)
        clock.advance(4)
        self.assertEqual(done, [])
        self.claims[0].callback([])
        self.assertEqual(len(done), 1)
        workers.wake()
        stuck = []
        workers.in_hand(5, clock).addCallback(stuck.append)
        clock.advance(5)
        self.assertEqual(len(stuck), 1)
