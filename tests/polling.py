"""Waiting for something another process or thread does: poll a condition with a deadline.

Used where the tests cannot be told (an unmount done by libfuse's helper, a server noticing a
dropped connection); never a fixed sleep for synchronization.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """True as soon as ``condition()`` holds; its last value once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
