"""The training step's statistics by name: summed on the device every step, averaged over ranks by name.

Inside a step, `report(name, value)` adds a value to be averaged over the log interval (over the
steps the step counts: non-finite steps are left out), `count(name, value)` one to be summed over
it, and `end_step(counted)` adds them all in one in-place update. A new statistic is one
`report` line; its name is its TensorBoard tag.

The names are fixed by the first step, and the sums are allocated then: a CUDA graph captured
later replays into the very tensors `take()` reads, so nothing here is ever replaced by a new tensor.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator


class RunningStats:
    """Named device scalars summed between two `take()` calls, with no host sync."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pending: dict[str, torch.Tensor] = {}  # this step's values, in report order
        self._summed: set[str] = set()  # names from `count`: summed, not averaged
        self._names: tuple[str, ...] = ()  # fixed by the first `end_step`
        self._sums: torch.Tensor | None = None
        self._is_count: torch.Tensor | None = None
        self._counted_steps = torch.zeros((), device=device)  # steps in the means since the last take

    def report(self, name: str, value: torch.Tensor) -> None:
        """A scalar to average over the interval's counted steps."""
        self._add(name, value)

    def count(self, name: str, value: torch.Tensor) -> None:
        """A scalar to sum over all the interval's steps (e.g. 1.0 for a skipped step)."""
        self._add(name, value)
        self._summed.add(name)

    def _add(self, name: str, value: torch.Tensor) -> None:
        if name in self._pending:
            raise ValueError(f"statistic {name!r} reported twice in one step")
        self._pending[name] = value.detach().float().reshape(())

    def end_step(self, counted: torch.Tensor) -> None:
        """Add this step's values; `counted` (device bool) says whether the means include this step."""
        names, values = tuple(self._pending), list(self._pending.values())
        self._pending.clear()
        if self._sums is None:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("RunningStats: the first step must run eagerly, before a CUDA graph capture, "
                                   "so that the sums exist outside the graph's memory")
            self._names = names
            self._sums = torch.zeros(len(names), device=self.device)
            self._is_count = torch.tensor([n in self._summed for n in names], device=self.device)
        elif names != self._names:
            raise ValueError(f"this step reported statistics {list(names)}, the first step {list(self._names)}: "
                             "every step reports the same names in the same order")
        self._sums += torch.where(self._is_count | counted, torch.stack(values), 0.0)
        self._counted_steps += counted.float()

    def discard_step(self) -> None:
        """Forget values reported by a step that did not finish (a failed CUDA graph capture)."""
        self._pending.clear()

    def take(self) -> dict[str, torch.Tensor]:
        """{name: device scalar} since the last call: means (NaN when no step counted) and counts; resets."""
        if self._sums is None:
            return {}
        values = torch.where(self._is_count, self._sums, self._sums / self._counted_steps)
        self._sums.zero_()
        self._counted_steps.zero_()
        return dict(zip(self._names, values.unbind()))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The running tensors themselves (not copies), by name: what a snapshot of the step saves."""
        if self._sums is None:
            return {"stats/counted_steps": self._counted_steps}
        return {"stats/sums": self._sums, "stats/counted_steps": self._counted_steps}


def reduce_by_name(accelerator: Accelerator, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average named device scalars over ranks and read them to the host: one collective, the values
    stacked in sorted name order (the same on every rank, whatever order each rank built its dict in)."""
    names = sorted(values)
    if not names:
        return {}
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names])
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, reduction="mean")
    return dict(zip(names, stacked.tolist()))
