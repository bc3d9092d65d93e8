"""Stop cleanly when the scheduler asks: SIGUSR1 (SLURM's warning before the time limit) or SIGTERM.

The handler only sets a flag; the training loop acts on it at a step boundary by writing a
checkpoint and returning, and the next start resumes from that checkpoint.

A signal may reach only some ranks, or reach them during different steps, so no rank acts on
its own flag: every `train.stop_check_every` steps all ranks combine their flags with one
one-element all-reduce and stop together at that same step. Between checks nothing is
synchronised, so a GPU run pays one host sync per `stop_check_every` steps, never one per step.
Latency from the signal to the checkpoint: at most `stop_check_every` steps plus one checkpoint
write. A single process checks its flag every step (no collective needed).

The handlers are installed before data-loader workers fork, so workers inherit them and a
SIGTERM sent to the whole process group does not kill them in the middle of an epoch.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

from accelerate import Accelerator

from dcgan_dist.parallel import any_rank

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Context manager: while active, STOP_SIGNALS set a flag instead of ending the process."""

    def __init__(self, accelerator: Accelerator, check_every: int):
        self.accelerator, self.check_every = accelerator, check_every
        self.received: str | None = None  # name of the first signal this process received
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        """Whether every rank stops after `step`; a collective on check steps, so call it on every rank."""
        if self.accelerator.num_processes == 1:
            return self.received is not None
        if step % self.check_every:
            return False
        return any_rank(self.accelerator, self.received is not None)

    def reason(self) -> str:
        return self.received or "a stop signal on another rank"
