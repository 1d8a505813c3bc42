"""Data-parallel runs on torch.distributed, as ``torchrun`` starts them.

Under ``torchrun --nproc-per-node N -m ann2snn ...`` (or any launcher that sets ``RANK`` and
``WORLD_SIZE``), every rank runs the same command on its own contiguous shard of the samples
(``Ranks.shard``: exact, each sample once, no padding); the per-step sums every report is built
from - correct answers or squared errors, spikes and synaptic operations per layer and step,
inputs aroused - are added across ranks with ``all_reduce`` (float64: counts stay exact), and
rank 0 alone writes and prints. NCCL on GPUs (one per rank, ``LOCAL_RANK``), gloo on CPUs. A
plain single-process command never touches torch.distributed (``Ranks()`` is one rank).

Failures: every data-parallel phase runs inside ``Ranks.phase``, which ends with a collective
check; a rank that failed shares its one-line message, and every rank stops with it, naming
the rank - none waits forever in a collective, and no output is written.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Iterator

import torch

from ann2snn.errors import UserError


class RankFailure(UserError):
    """A rank failed; every rank has printed this already (``reported``)."""

    reported = True


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        """The rank that writes outputs and prints."""
        return self.rank == 0

    def shard(self, n: int, rank: int | None = None) -> range:
        """This rank's contiguous block of ``n`` items: sizes differ by at most one."""
        r = self.rank if rank is None else rank
        return range(r * n // self.world, (r + 1) * n // self.world)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (float64, on the CPU)."""
        out = tensor.detach().double().cpu().clone()
        if self.active:
            import torch.distributed as dist

            moved = out.to(_collective_device())
            dist.all_reduce(moved)
            out = moved.cpu()
        return out

    def max(self, value: float) -> float:
        if not self.active:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def gather(self, value) -> list:
        """Every rank's ``value`` (picklable, produced by our own code), in rank order."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    @contextlib.contextmanager
    def phase(self) -> Iterator[None]:
        """Run a block on every rank; if any rank fails in it, every rank raises that rank's
        one-line error (``rank R: ...``) when the block ends."""
        if not self.active:
            yield
            return
        message = None
        try:
            yield
        except UserError as exc:
            message = str(exc)
        except Exception as exc:  # a bug on one rank must still end the others
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        failed = [(r, m) for r, m in enumerate(self.gather(message)) if m is not None]
        if failed:
            r, m = failed[0]
            error = RankFailure(f"rank {r} of {self.world}: {m}")
            sys.stderr.write(f"ann2snn: error: {error}\n")  # one write: ranks share the stream
            sys.stderr.flush()  # every rank has said it before any exits
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.barrier()
            raise error


_RANKS = Ranks()


def current() -> Ranks:
    return _RANKS


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def start(device: str = "auto") -> Ranks:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1), once; else one rank.
    Returns the ranks, also kept for ``current()``."""
    global _RANKS
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or _RANKS.active:
        return _RANKS
    import torch.distributed as dist

    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    except Exception as exc:
        raise UserError(f"torch.distributed: cannot join the process group ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    _RANKS = Ranks(dist.get_rank(), dist.get_world_size())
    return _RANKS


def stop() -> None:
    global _RANKS
    if _RANKS.active:
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _RANKS = Ranks()


def rank_device(device: str) -> str:
    """Under a launcher with GPUs, each rank uses its own (``LOCAL_RANK``)."""
    if _RANKS.active and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device
