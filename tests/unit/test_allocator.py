"""The malloc thresholds are taken by this platform's libc (glibc here)."""

from __future__ import annotations

import sys

import pytest

from wan_dist.run.allocator import keep_freed_host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_thresholds_are_applied():
    assert keep_freed_host_memory() is True
