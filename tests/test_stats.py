"""Named step statistics: means over counted steps, counts over all steps, in-place sums, reduction by name."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dcgan_dist.stats import RunningStats, reduce_by_name

CPU = torch.device("cpu")


def run_steps(stats: RunningStats, steps: list[tuple[float, float, bool]]) -> None:
    for loss, skipped, counted in steps:
        stats.report("loss", torch.tensor(loss))
        stats.count("skipped", torch.tensor(skipped))
        stats.end_step(counted=torch.tensor(counted))


def test_means_leave_out_uncounted_steps_and_counts_sum_every_step():
    stats = RunningStats(CPU)
    run_steps(stats, [(1.0, 0.0, True), (float("nan"), 1.0, False), (3.0, 0.0, True)])
    taken = stats.take()
    assert taken.keys() == {"loss", "skipped"}
    assert float(taken["loss"]) == 2.0 and float(taken["skipped"]) == 1.0
    run_steps(stats, [(5.0, 1.0, False)])
    taken = stats.take()  # reset by the previous take; no counted step: NaN, not a made-up 0
    assert torch.isnan(taken["loss"]) and float(taken["skipped"]) == 1.0


def test_sums_are_allocated_once_and_updated_in_place():
    stats = RunningStats(CPU)
    run_steps(stats, [(1.0, 0.0, True)])
    tensors = {name: (t, t.data_ptr()) for name, t in stats.state_tensors().items()}
    run_steps(stats, [(2.0, 0.0, True), (3.0, 1.0, True)])
    stats.take()
    run_steps(stats, [(4.0, 0.0, True)])
    assert all(stats.state_tensors()[name] is t and t.data_ptr() == ptr for name, (t, ptr) in tensors.items())


def test_names_are_fixed_by_the_first_step():
    stats = RunningStats(CPU)
    run_steps(stats, [(1.0, 0.0, True)])
    stats.report("loss", torch.tensor(1.0))
    with pytest.raises(ValueError, match="reported twice in one step"):
        stats.report("loss", torch.tensor(2.0))
    stats.discard_step()
    stats.report("loss", torch.tensor(1.0))
    stats.report("new/stat", torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"this step reported statistics \['loss', 'new/stat'\], the first step "
                                         r"\['loss', 'skipped'\]"):
        stats.end_step(counted=torch.tensor(True))


class TwoRanks:
    """Stands in for a 2-process accelerator: `reduce` averages with what the other rank stacked."""

    num_processes = 2

    def __init__(self, other: torch.Tensor | None = None):
        self.other, self.sent = other, None

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "mean"
        self.sent = tensor.clone()
        return (tensor + self.other) / 2 if self.other is not None else tensor


def test_reduction_averages_over_ranks_by_name_whatever_order_each_rank_reported_in():
    rank1 = {"loss/G": torch.tensor(4.0), "D(x)": torch.tensor(0.25), "loss/D": torch.tensor(1.0)}
    rank0 = {"loss/D": torch.tensor(3.0), "loss/G": torch.tensor(2.0), "D(x)": torch.tensor(0.75)}
    first = TwoRanks()
    reduce_by_name(first, rank1)  # what rank 1 puts into the collective
    reduced = reduce_by_name(TwoRanks(other=first.sent), rank0)
    assert reduced == {"D(x)": 0.5, "loss/D": 2.0, "loss/G": 3.0}
    assert reduce_by_name(SimpleNamespace(num_processes=1), rank0) == {"D(x)": 0.75, "loss/D": 3.0, "loss/G": 2.0}
