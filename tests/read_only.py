"""A directory made unwritable for the test's process, also when the tests run as root (whom file
modes do not stop): the immutable attribute then (``chattr +i``), a read-only mode otherwise."""

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


def assert_unwritable(directory: Path) -> None:
    """The guard must really hold: a test of a read-only store that could still write proves nothing."""
    probe = directory / ".write-probe"
    with pytest.raises(OSError):
        probe.write_bytes(b"")
    assert not probe.exists()


@contextlib.contextmanager
def read_only(directory: Path):
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            assert_unwritable(directory)
            yield directory
        finally:
            directory.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: no way to make a directory read-only")
    try:
        assert_unwritable(directory)
        yield directory
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)
