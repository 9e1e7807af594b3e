"""The sample messages of tests/samples (see its README.md), for the corpus tests."""

import os

SAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")
NOT_MESSAGES = ("LICENSE", "README.md")


def sample_messages() -> list[str]:
    """Paths of every sample message, sorted; licence and README files are not messages."""
    return sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(SAMPLES)
        for name in names
        if name not in NOT_MESSAGES
    )
