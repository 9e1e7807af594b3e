"""
What makes a child of the daemon background work: niced, so that taking
mail in goes first when the CPUs are busy, and its memory capped. Kept
apart from the children's modules so each imports only this.
"""

import os
import resource

# Added to the niceness of a parser worker, the sender check process and the scan process.
NICENESS = 10


def limit_memory(limit: int) -> None:
    """Cap this process's address space at C{limit} bytes, for good: beyond it allocations raise MemoryError."""
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_in_background(memory_limit: int | None) -> None:
    """Nice this process by L{NICENESS} and cap its memory at C{memory_limit} bytes (None: no cap)."""
    os.nice(NICENESS)
    if memory_limit is not None:
        limit_memory(memory_limit)
