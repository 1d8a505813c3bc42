"""A race of the operating-point candidates (successive halving): each round simulates the
candidates still in it on more of the search images, and the worse half leaves the race.

Every candidate runs its full steps (the choice asks for a run that stays within the bars over
the second half of its steps, which a shorter run cannot show) on the first ``FIRST`` search
images; after each round the candidates are ranked as the choice ranks them, on the images so
far, with each bar widened by two of its standard errors on those images
(2 sqrt(bar (1 - bar) / n)): a candidate within the widened bars ranks by its cost (its worst
ratio of spikes to the baseline's), one outside them after every such candidate. The better half
(at least ``KEEP``) goes on to twice the images, and so does the candidate the bars rest on (the
least disagreement over the second half of its run); ``KEEP`` candidates run on every search image,
and the choice among them is the full search's, on all of them. A candidate carries its totals
from round to round (it is never simulated twice on an image). Regression tasks, whose bar has
no binomial standard error, and search sets of fewer than 2 ``FIRST`` images run every
candidate on every image (one round).
"""

from __future__ import annotations

import math

import torch

from ann2snn.io.data import TensorData
from ann2snn.search.budget import Agreement, OutputError
from ann2snn.sim.network import Network

FIRST = 256  # images of the first round
KEEP = 2  # candidates that run on every search image


def rounds(images: int, regression: bool = False) -> list[int]:
    """The images simulated by the end of each round: FIRST, doubling, then all of them."""
    if regression or images < 2 * FIRST:
        return [images]
    out = [FIRST]
    while 2 * out[-1] < images:
        out.append(2 * out[-1])
    return out + [images]


def widened(limits: list[float], images: int) -> list[float]:
    """Each disagreement bar plus two of its binomial standard errors on ``images`` images."""
    return [b + 2 * math.sqrt(b * (1 - b) / max(images, 1)) for b in limits]


class Entrant:
    """One network in the race, with its totals over the search images simulated so far (in
    order): the observer's per-step sums and the spikes per step."""

    def __init__(self, net: Network, reference: torch.Tensor, timesteps: int, classify: bool):
        self.net, self.timesteps, self.classify = net, timesteps, classify
        self.observer = Agreement(reference.argmax(1), timesteps) if classify else OutputError(reference, timesteps)
        self.spikes = torch.zeros(timesteps, dtype=torch.float64)
        self.images = 0

    def run_to(self, data: TensorData, images: int, batch_size: int, device: torch.device, label: str) -> None:
        """Simulate the search images from where it stopped up to ``images``."""
        if images <= self.images:
            return
        part = data.subset(torch.arange(self.images, images))
        sim = self.net.simulate(part, self.timesteps, batch_size, device, observers=[self.observer], label=label)
        self.spikes += sim.spikes.sum(0)
        self.images = images

    def curves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(share of its images whose class is not the ANN's, or output error, after each step;
        spikes per sample by then)."""
        n = max(self.images, 1)
        error = 1.0 - self.observer.per_step / n if self.classify else self.observer.per_step()
        return error, self.spikes.cumsum(0) / n


def survivors(ranked: list[int], bar_setter: int) -> list[int]:
    """The better half of the candidates ``ranked`` best first (at least ``KEEP``), and
    ``bar_setter``, the candidate of the least disagreement over the second half of its run: the
    choice's bars rest on it (``operating_point.bars``), so it runs on every image as it would
    in the full search."""
    keep = ranked[:max(KEEP, math.ceil(len(ranked) / 2))]
    return keep if bar_setter in keep else keep + [bar_setter]
