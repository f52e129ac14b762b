"""Several processes, one job: torchrun's environment, sharding, rank-0 writes and gathering per-point results.

Built on torch.distributed (https://pytorch.org/docs/stable/distributed.html): `torchrun` sets RANK, WORLD_SIZE and
LOCAL_RANK; gloo serves CPUs and nccl CUDA GPUs. Training wraps the model in DistributedDataParallel, whose buckets
hold only parameters that require a gradient (the LoRA factors and the head on a frozen base). Without torchrun,
every helper here is a no-op over a world of one.
"""

import atexit
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
from torch import nn

from loradar_cli.errors import LoradarError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes to the store, prints results and draws progress."""
        return self.rank == 0


def single_process() -> World:
    return World()


def env_world() -> World:
    """The world torchrun describes in the environment (a world of one without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: torch.device) -> World:
    """Join torchrun's process group once per process: nccl on CUDA, gloo otherwise."""
    world = env_world()
    if world.size > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(leave_process_group)
    return world


def leave_process_group() -> None:
    """Destroy this process's group before the interpreter exits.

    Left to interpreter finalisation, a rank that finishes first (every rank but 0 returns before rank 0 prints)
    could tear the group down while its peer still holds it, and abort (SIGABRT) instead of exiting 0.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_job(code: int) -> NoReturn:
    """End this process of a multi-process job with `code`, without interpreter finalisation.

    Gloo's C++ threads can still hold objects when the interpreter is torn down; destroying them then calls
    std::terminate ("terminate called without an active exception") now and then, which turned a run that had
    printed its results into a SIGABRT and a failed torchrun (pytorch/pytorch#179291 discusses the teardown). A rank
    whose part succeeded first waits for every rank at a barrier, so no collective is pending; if a peer failed
    instead, the barrier fails and this rank exits 1 (the peer reports the error). The standard streams are flushed;
    store writes are atomic and already closed.
    """
    if code == 0:
        try:
            torch.distributed.barrier()
        except Exception:  # a peer left without reaching the barrier: it failed and reports it
            code = 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def wrap_ddp(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the trainable parameters when there are several processes, else the model."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    # no buffer broadcast before each forward: adapters train with BatchNorm in eval mode (buffers never change),
    # and ranks start from the same buffers; newer torch names the switch forward_sync_buffers
    sync = (
        "forward_sync_buffers"
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else "broadcast_buffers"
    )
    return DistributedDataParallel(model, device_ids=ids, **{sync: False})


def on_main(world: World, write: Callable[[], T]) -> T | None:
    """Run `write` on rank 0 while the others wait; a failure on rank 0 fails every rank with its message."""
    if world.size == 1:
        return write()
    result, error = None, None
    if world.is_main:
        try:
            result = write()
        except Exception as err:  # re-raised below, after the other ranks learn of it
            error = err
    box: list[Any] = [None if error is None else str(getattr(error, "message", error))]
    torch.distributed.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        raise LoradarError(f"rank 0 failed: {box[0]}")
    return result


def spread(world: World, jobs: Sequence[Callable[[], T]], costs: Sequence[float]) -> list[T]:
    """Every job's (picklable) result on every rank, each job run on one rank only; a failure fails every rank.

    Jobs go costliest first to the least loaded rank (longest-processing-time scheduling, Graham 1969), so a
    handful of unequal side computations, such as the evaluation's sanity-check attacks, take about 1/size of
    their one-process time. The jobs must not communicate.
    """
    if world.size == 1:
        return [job() for job in jobs]
    owners = _lpt_owners(costs, world.size)
    mine: dict[int, T] = {}
    failure: Exception | None = None
    for i, job in enumerate(jobs):
        if owners[i] == world.rank and failure is None:
            try:
                mine[i] = job()
            except Exception as err:  # re-raised below, after the other ranks learn of it
                failure = err
    parts = gather(world, (mine, None if failure is None else str(getattr(failure, "message", failure))))
    if failure is not None:
        raise failure
    failed = [(rank, message) for rank, (_, message) in enumerate(parts) if message is not None]
    if failed:
        raise LoradarError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    results = {i: result for done, _ in parts for i, result in done.items()}
    return [results[i] for i in range(len(jobs))]


def _lpt_owners(costs: Sequence[float], size: int) -> list[int]:
    """The rank of each job: in order of decreasing cost, to the rank with the least assigned so far (lowest wins)."""
    load, owners = [0.0] * size, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: -costs[j]):
        owners[i] = min(range(size), key=lambda r: load[r])
        load[owners[i]] += costs[i]
    return owners


def local_batches(n: int, batch_size: int, world: World) -> list[tuple[int, range]]:
    """(global batch number, point indices) of this rank: batch b of the whole run goes to rank b mod world size.

    Batches are the same as one process would make, so per-batch seeding gives every point the same attack.
    """
    starts = range(0, n, batch_size)
    return [(b, range(s, min(s + batch_size, n))) for b, s in enumerate(starts) if b % world.size == world.rank]


def batch_seed(seed: int, number: int) -> int:
    """The RNG seed of evaluation batch `number` in a run seeded by `seed` (the same in every process)."""
    return (seed * 1_000_003 + number) % (2**63)


def point_seeds(seed: int, epoch: int, points: torch.Tensor) -> list[int]:
    """The random-start seed of each training point in an epoch: a function of the point, not of its batch's shard."""
    base = (seed * 1_000_003 + epoch) * 1_000_033
    return [(base + int(i)) % (2**63) for i in points.tolist()]


def gather(world: World, item: T) -> list[T]:
    """Every rank's `item` (picklable, on the CPU), in rank order; [item] in a world of one."""
    if world.size == 1:
        return [item]
    out: list[Any] = [None] * world.size
    torch.distributed.all_gather_object(out, item)
    return out


def gather_points(world: World, parts: Sequence[tuple[int, torch.Tensor]], n: int) -> torch.Tensor:
    """Per-point results of all ranks in point order, from (first point index, values [b, ...]) pairs."""
    pieces = [(start, t.cpu()) for chunk in gather(world, list(parts)) for start, t in chunk]
    if not pieces:
        return torch.zeros(0)
    pieces.sort(key=lambda p: p[0])
    out = torch.cat([t for _, t in pieces])
    if len(out) != n:
        raise LoradarError(f"gathered {len(out)} results for {n} points")
    return out


def all_mean(world: World, value: float, weight: int) -> float:
    """The weighted mean of a per-rank value over all ranks (e.g. a training loss)."""
    if world.size == 1:
        return value
    pairs = gather(world, (value * weight, weight))
    total = sum(w for _, w in pairs)
    return sum(v for v, _ in pairs) / max(total, 1)
