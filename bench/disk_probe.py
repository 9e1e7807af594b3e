"""
What creating a small file costs the kernel on the benchmark's disk.

Every durable target creates a file per message (mailingest's blob,
aiosmtpd's copy, Postfix's queue file), and on a shared ext4 disk the
kernel's share of that varies with what else writes to the disk: on the
2-core VM of issue 29, 23 µs per file when quiet and up to 800 µs while a
test suite ran beside it (ext4's inode allocator skipping recently deleted
inodes). The report gives this figure at the start and the end of a run, so
CPU per message is compared only between runs where it is alike.
"""

import os
import resource
import tempfile

FILES = 2000
PAYLOAD = b"x" * 1024


def file_creation_us(parent: str, files: int = FILES) -> float:
    """
    Kernel CPU (µs) per 1 KiB file created and written in a new directory
    under C{parent}. The files stay there, removed with C{parent}: deleting
    them would slow the rounds that follow, the very effect measured.
    """
    directory = tempfile.mkdtemp(prefix="disk-probe-", dir=parent)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    for n in range(files):
        fd = os.open(os.path.join(directory, str(n)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, PAYLOAD)
        finally:
            os.close(fd)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_stime - before) * 1e6 / files
