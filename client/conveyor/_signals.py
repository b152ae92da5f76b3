"""Opt-in SIGTERM handling that cooperates with the application's own: our handler runs first (it closes a
handle), then whatever was installed before it is chained: a Python handler is called, ``SIG_IGN`` is kept,
and the default action (terminate) is taken by re-raising the signal with the default disposition, so the
process still exits with "killed by SIGTERM" as a supervisor expects."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

Chain = Callable[[], None]


def chain_previous(previous: Any, signum: int, frame: FrameType | None) -> None:
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:  # SIG_DFL, or a handler installed outside Python (None)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


class SigtermHook:
    """Installs ``on_signal(chain)`` as the SIGTERM handler; ``on_signal`` must call ``chain()`` once it has
    done its part (now, or later from the event loop). ``remove()`` puts the previous handler back if ours is
    still the installed one; otherwise (someone chained on top of us) ours stays and only passes through."""

    def __init__(self, on_signal: Callable[[Chain], None], signum: int = signal.SIGTERM) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "handle_signals=True installs a SIGTERM handler, which Python allows only in the main thread: "
                "start the handle there, or leave handle_signals off and close it yourself"
            )
        self.signum = signum
        self.on_signal = on_signal
        self.active = True
        self.previous = signal.getsignal(signum)
        signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        def chain() -> None:
            chain_previous(self.previous, signum, frame)

        if not self.active:
            chain()
            return
        self.active = False
        self.on_signal(chain)

    def remove(self) -> None:
        self.active = False
        if threading.current_thread() is threading.main_thread() and signal.getsignal(self.signum) == self._handle:
            signal.signal(self.signum, self.previous)
