"""
An admin's word that a message's infected content may be handed over: the
one path of the admin command's C{release --allow-infected} and the
console's "Release infected content", so both record the same history row
(C{infected-allowed}) and say the same.
"""

from mailingest.interfaces import IQuarantineStore


def allowed_lines(row: dict) -> list[str]:
    """What letting C{row}'s infected content out does, as the admin command prints it and the console logs it."""
    said = [f"message {row['id']}: its infected documents may be downloaded ({row['virus_detail']}); recorded in its history"]
    if row["status"] == "quarantined":
        said.append(f"released message {row['id']}: queued for extraction")
    return said


async def allow_infected(store: IQuarantineStore, row: dict) -> list[str]:
    """Let C{row}'s infected documents and raw copy be downloaded (and release it if quarantined); L{allowed_lines}."""
    await store.allow_infected(row["id"])
    if row["status"] == "quarantined":
        await store.release(row["id"])
    return allowed_lines(row)
