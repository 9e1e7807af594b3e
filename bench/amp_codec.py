"""
CPU per message row of what the parent and an intake process say to each
other (C{mailingest.app.intake_protocol}): the child packing rows into one
L{InsertMessages} box, the parent parsing and unpacking it and answering, the
child parsing the answer; beside it, the pickled netstrings of one call per
message that AMP replaced. Process time, best of several tries, so another
busy process on the machine matters little.

    python -m bench.amp_codec
"""

import pickle
import time
from datetime import datetime, timezone

from twisted.protocols import amp

from mailingest.app.intake_protocol import ROW_FIELDS, InsertMessages, pack

ROW = {
    "org_id": 7, "source": "smtp", "source_message_id": "<20261206.abcdef.123@mail.customer.example>",
    "mail_from": "orders@customer.example", "rcpt_to": "orders+acme@example.com", "subject": "PO 4711 for delivery",
    "raw_key": "raw/2026/12/06/" + "ab" * 32, "raw_size": 1834, "raw_sha256": "cd" * 32, "content_sha256": "ef" * 32,
    "received_at": datetime.now(timezone.utc), "client_ip": "192.0.2.7", "helo": "mail.customer.example", "tls": None,
}


class _Boxes:
    """What a BinaryBoxProtocol hands its receiver: the boxes, kept."""

    def __init__(self):
        self.boxes = []

    def startReceivingBoxes(self, sender):
        pass

    def ampBoxReceived(self, box):
        self.boxes.append(box)

    def stopReceivingBoxes(self, reason):
        pass


def amp_call(rows: int) -> None:
    proto = amp.AMP()
    receiver = _Boxes()
    wire = amp.BinaryBoxProtocol(receiver)
    packed = [pack(dict(ROW, batch=i), ROW_FIELDS) for i in range(rows)]
    wire.dataReceived(InsertMessages.makeArguments({"rows": packed}, proto).serialize())
    InsertMessages.parseArguments(receiver.boxes.pop(), proto)
    answer = {"kinds": b"n" * rows, "ids": list(range(rows)), "errors": []}
    wire.dataReceived(InsertMessages.makeResponse(answer, proto).serialize())
    InsertMessages.parseResponse(receiver.boxes.pop(), proto)


def pickle_calls(rows: int) -> None:
    for _ in range(rows):
        pickle.loads(pickle.dumps(("call", 1, "insert_messages", ([ROW],))))
        pickle.loads(pickle.dumps(("reply", 1, True, [("new", 5)])))


def per_row(call, rows: int, repeat: int = 2000, tries: int = 7) -> float:
    best = float("inf")
    for _ in range(tries):
        start = time.process_time()
        for _ in range(repeat):
            call(rows)
        best = min(best, (time.process_time() - start) / repeat / rows)
    return best * 1e6


def main() -> None:
    print("| rows per call | AMP µs per row | pickled netstrings µs per row |")
    print("| ---: | ---: | ---: |")
    for rows in (1, 3, 5, 10):
        print(f"| {rows} | {per_row(amp_call, rows):.1f} | {per_row(pickle_calls, rows):.1f} |")


if __name__ == "__main__":
    main()
