"""SIGTERM and SIGINT during training: save a checkpoint at the next step boundary, then stop."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Dict, Optional

log = logging.getLogger("stop_fast.train")


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step boundary and returns.
    A second signal interrupts at once. Handlers are installed only in the main thread."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint after the current step", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def requested(self) -> bool:
        return self.signum is not None
