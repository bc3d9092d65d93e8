"""What the user sees: TensorBoard events and the console, written by the main process only.

Scalars are reduced over ranks before they get here (`stats.reduce_by_name`), so every process
takes part in the collective call while only one writes.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from dcgan_dist.imaging import to_unit

TB_DIR = "tb"


def image_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """[-1, 1] float or uint8 (N, C, H, W) -> one float grid in [0, 1] for TensorBoard."""
    return make_grid(to_unit(images.detach().cpu()), nrow=nrow, padding=2)


class RunLogger:
    """TensorBoard writer plus progress bar; every method is a no-op off the main process.

    As a context manager it closes both on the way out, also when the run ends with an exception.
    """

    def __init__(self, accelerator: Accelerator, run_dir: Path, start_step: int, total_steps: int):
        self.enabled = accelerator.is_main_process
        self.writer = None
        self.bar = None
        if self.enabled:
            # purge_step hides the events a crashed run wrote after its last checkpoint (all of them when it
            # crashed before its first one: a start from step 0 purges from 0), so curves never repeat a step
            self.writer = SummaryWriter(str(Path(run_dir) / TB_DIR), purge_step=start_step + 1 if start_step else 0)
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=1.0)
        self._t0, self._step0 = time.perf_counter(), start_step

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def grid(self, tag: str, step: int, images: torch.Tensor) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_grid(images), step)

    def text(self, tag: str, step: int, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def show(self, values: dict[str, float]) -> None:
        """Progress-bar postfix: img/s and the two losses (ETA and step of total come from tqdm)."""
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)

    def rate(self, step: int, images_per_step: int) -> float:
        """Images per second since the previous call (all ranks together)."""
        now = time.perf_counter()
        rate = (step - self._step0) * images_per_step / max(now - self._t0, 1e-9)
        self._t0, self._step0 = now, step
        return rate

    def message(self, line: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(line)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
