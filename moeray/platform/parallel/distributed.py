"""Rank layout, process groups and the CUDA environment of a pipeline worker.

Rank layout (`Topology`): global rank = (pp_rank * DP + dp_rank) * EP + ep_rank. EP is innermost
(its all-to-all is the heaviest traffic: keep it inside a node), pipeline outermost (one
activation per micro-batch crosses a stage boundary). With PP = 1 this is the EP x DP layout of
`train/replica.py`.

Streams (`PipelineGroups`). Between two pipeline ranks four kinds of stream can flow: activations
and gradients of each direction. Every stream has its own two-rank process group, so the messages
of one stream are matched in order (micro-batch order on both ends, which every schedule keeps)
without tags, and every communicator carries one stream one way: a rank only sends or only
receives on it, so NCCL never queues a send of one stream behind a receive of another, and no
send/recv pair on one communicator can be posted in clashing orders. Every message goes through
`dist.batch_isend_irecv` (a batch of one: torch batches only ops of one group, and each group
holds one stream): on NCCL a batched p2p op runs on the group's own communicator, made when the
group is (`init_distributed` binds the device, so `new_group` splits it eagerly) and checked by
`PipelineGroups.create`, where a lone `isend`/`irecv` would lazily build a separate two-rank
communicator at its first message. That lazy build blocks until the peer builds the same one, and
DualPipe's first messages differ per rank (rank 0 first receives direction 1's activations, rank 1
direction 0's): both ranks wait in different communicators' setup forever. The communicator alone
is not enough: NCCL also connects a pair of ranks for point-to-point traffic lazily, inside the
first send/recv between them, and that connection step blocks until the peer posts its matching
op on the same communicator, so ranks whose first messages differ wait there forever. So
`PipelineGroups.create` also warms every stream (`warm_links`): one small message per stream and
one all-to-all per EP group, in one global order, before any step.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    pp: int
    dp: int = 1
    ep: int = 1

    def __post_init__(self):
        if min(self.pp, self.dp, self.ep) < 1:
            raise ValueError(f"pp={self.pp}, dp={self.dp}, ep={self.ep} must all be >= 1")

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.ep

    @property
    def shards(self) -> int:
        """Data shards: every (dp, ep) coordinate is one pipeline with its own slice of the
        batch."""
        return self.dp * self.ep

    def rank(self, pp_rank: int, dp_rank: int, ep_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.ep + ep_rank

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, ep_rank) of a global rank."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank={rank} outside a world of {self.world}")
        return rank // (self.dp * self.ep), rank // self.ep % self.dp, rank % self.ep

    def shard(self, rank: int) -> int:
        """This rank's data shard: all pipeline ranks of one (dp, ep) pipeline read the same one."""
        _, d, e = self.coords(rank)
        return d * self.ep + e


TIMEOUT_ENV = "MOERAY_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0  # 10 minutes: far above any step here (the small model on GPUs: seconds)


def dist_timeout_s(environ: dict[str, str] | None = None) -> float:
    """How long a collective or p2p op may wait before the process group fails it, in seconds:
    env MOERAY_DIST_TIMEOUT_S, default 600. A hang becomes an error after this long."""
    raw = (os.environ if environ is None else environ).get(TIMEOUT_ENV, "")
    if raw.strip() == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


# The CUDA environment of a pipeline worker; it must be in place before the process creates its
# CUDA context (`apply_cuda_env`, and the Ray job's runtime_env, train/job.py). Set, not defaulted:
# CUDA images often export other values (NVIDIA's containers export CUDA_MODULE_LOADING=LAZY).
CUDA_ENV = {
    # CUDA loads a kernel's module at its first launch by default (lazy loading), and a load may
    # wait for the whole device: with a peer's NCCL receive spinning on this GPU, that wait never
    # ends. Load torch's kernels at context creation; Triton's are loaded by
    # `PipelineExecutor.rehearse`.
    "CUDA_MODULE_LOADING": "EAGER",
    # Streams share the GPU's hardware work queues, 8 by default: kernels of two streams on one
    # queue run in launch order. A rank here has ~20 streams (two compute streams, one NCCL stream
    # per communicator), so a receive spinning on its communicator's stream can hold back compute
    # of the other direction queued behind it on the same hardware queue -- the compute that
    # leads to the message the peer waits for. 32 (the most) gives every stream its own queue.
    "CUDA_DEVICE_MAX_CONNECTIONS": "32",
    # torch's native allocator calls cudaMalloc at each new peak of a stream's cache, and a
    # cudaMalloc waits for the whole GPU to idle: the deadlock above again (two EP peers, each in
    # an allocation while its GPU spins on the other's all-to-all).
    # The stream-ordered allocator (cudaMallocAsync) allocates without a device-wide wait. torch
    # picks its allocator when it is imported: launchers put this in a worker's environment before
    # the process starts (train/bench.py's spawn, train/job.py's runtime_env).
    "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync",
}

# The CUDA environment of a process that captures CUDA graphs (a serving EP rank, a training job
# with `cuda_graphs`): CUDA_ENV without the allocator choice. A serving rank
# captures its decode steps, Triton kernels included, as CUDA graphs; under cudaMallocAsync the
# tensors allocated inside a capture have no address until the graph first launches, and Triton's
# launcher refuses them ("Pointer argument cannot be accessed from Triton"), so no decode graph
# could be captured (H200, torch 2.11, Triton 3.6); a graphed training step failed the same way at
# its first RMSNorm. torch's caching allocator gives captured tensors real addresses from the
# graph's private pool. Its cudaMalloc runs only at a new peak, which a rank reaches while
# capturing and in its first prefills, before the gang serves traffic (a graphed training job
# has one rank: no peer to wait on).
GRAPHS_CUDA_ENV = {k: v for k, v in CUDA_ENV.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}


def apply_cuda_env(environ, cuda_env: Mapping[str, str] = CUDA_ENV) -> None:
    """Put `cuda_env` (CUDA_ENV or GRAPHS_CUDA_ENV) into `environ` (os.environ); a ValueError if
    this process's CUDA context already exists, since the settings would then be silently
    ignored."""
    if torch.cuda.is_initialized() and any(environ.get(k) != v for k, v in cuda_env.items()):
        current = {k: environ.get(k) for k in cuda_env}
        raise ValueError(
            f"CUDA is already initialized with {current}; a distributed worker needs "
            f"{dict(cuda_env)} before its first CUDA call"
        )
    environ.update(cuda_env)


def init_distributed(
    rank: int,
    world: int,
    init_method: str,
    device: torch.device,
    cuda_env: Mapping[str, str] = CUDA_ENV,
) -> None:
    """init_process_group for one worker of `world`: gloo on CPU, NCCL on CUDA, timeout from
    `dist_timeout_s`. On CUDA the device is made current *before* the group exists and bound to it
    (`device_id`): NCCL then builds the world communicator at once, and every later `new_group`
    splits its communicator from it eagerly (all ranks of the world take part in each split,
    members or not, so every rank must make every group in one order: `PipelineGroups.create`).
    `cuda_env`: CUDA_ENV for training workers (the stream-ordered allocator is then required),
    GRAPHS_CUDA_ENV for serving ranks.
    Without the binding NCCL guesses the device from the global rank and builds communicators
    lazily at each group's first op."""
    timeout = datetime.timedelta(seconds=dist_timeout_s())
    if device.type == "cuda":
        if device.index is None:
            raise ValueError(
                f"device={device}: a CUDA worker needs an explicit index (cuda:<local rank>)"
            )
        apply_cuda_env(os.environ, cuda_env)
        backend = (
            torch.cuda.get_allocator_backend()
            if hasattr(torch._C, "_cuda_getAllocatorBackend")
            else "none (torch built without CUDA)"
        )
        if "PYTORCH_CUDA_ALLOC_CONF" in cuda_env and backend != "cudaMallocAsync":
            raise ValueError(
                f"the CUDA allocator is {backend!r}; a pipeline worker needs "
                f"PYTORCH_CUDA_ALLOC_CONF={CUDA_ENV['PYTORCH_CUDA_ALLOC_CONF']!r} in its "
                f"environment before torch is imported (its launcher's job: distributed.CUDA_ENV)"
            )
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl",
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=device,
        )
    elif device.type == "cpu":
        dist.init_process_group(
            "gloo", init_method=init_method, rank=rank, world_size=world, timeout=timeout
        )
    else:
        raise ValueError(f"device={device}: expected cpu or cuda")


def check_groups(
    made: list[tuple[str, tuple[int, ...], Any]], rank: int, world: int, device: torch.device
) -> int:
    """Run one small all-reduce on every group of `made` (name, global ranks, group) that this rank
    belongs to, in list order, each finished before the next, and check that exactly the listed
    ranks answered. Returns how many groups were checked.

    Every rank walks the same list, so the groups' first ops (and on NCCL any communicator set-up
    still pending) happen in one global order: the earliest unfinished group always has all its
    members waiting in it, so this cannot deadlock, whereas first ops issued in rank-dependent
    orders (DualPipe's first messages) can. A mismatch means the ranks disagree on the groups."""
    checked = 0
    for name, ranks, group in made:
        if rank not in ranks or len(ranks) < 2:
            continue
        onehot_W = torch.zeros(world, device=device)
        onehot_W[rank] = 1.0
        dist.all_reduce(onehot_W, group=group)
        answered = [r for r, v in enumerate(onehot_W.tolist()) if v != 0.0]
        if answered != sorted(ranks) or max(onehot_W.tolist()) != 1.0:
            raise RuntimeError(
                f"process group {name} of ranks {sorted(ranks)}: rank {rank} saw "
                f"{onehot_W.tolist()} (the ranks created their groups differently)"
            )
        checked += 1
    return checked


def warm_links(
    links: list[tuple[int, int, Any]],
    ep_groups: list[tuple[tuple[int, ...], Any]],
    rank: int,
    device: torch.device,
) -> None:
    """Make NCCL connect every point-to-point path before the first step (module docstring,
    "Streams"): one 1-element message per stream (src -> dst, through `batch_isend_irecv` as the
    steps do) and one all-to-all per EP group, walked in one global order by every rank, each
    finished on the host before the next, so the earliest unfinished one always has both (all)
    its ranks in it. Cheap on gloo too (a few ms), where it also checks the streams' ends."""
    for src, dst, group in links:
        if rank not in (src, dst):
            continue
        buf = torch.full((1,), float(src), device=device)
        if rank == dst:
            buf.zero_()
        op = dist.isend if rank == src else dist.irecv
        (work,) = dist.batch_isend_irecv([dist.P2POp(op, buf, dst if rank == src else src, group)])
        work.wait()
        if rank == dst and buf.item() != float(src):  # .item() also syncs the host on CUDA
            raise RuntimeError(
                f"stream {src} -> {dst}: received {buf.item()}, expected {float(src)}"
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for ranks, group in ep_groups:
        if rank not in ranks:
            continue
        x = torch.full((len(ranks),), float(rank), device=device)
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x, group=group)
        if y.tolist() != [float(r) for r in ranks]:
            raise RuntimeError(f"EP group {ranks}: all-to-all gave {y.tolist()} on rank {rank}")


@dataclass
class PipelineGroups:
    """Every process group a pipeline rank uses; `create` makes them on all ranks in one order."""

    topology: Topology
    rank: int
    ep: dict[int, Any]  # direction -> this rank's EP group (None when EP = 1)
    p2p: dict[
        tuple[str, int, int], tuple[Any, int, int]
    ]  # (kind, direction, stage s) -> (group, src, dst)
    sync: dict[
        tuple[tuple[int, ...], bool], Any
    ]  # (holder pp ranks, expert?) -> group (None: alone)
    made: list[tuple[str, tuple[int, ...], Any]] = field(default_factory=list)  # creation order

    @staticmethod
    def create(
        topology: Topology,
        rank: int,
        directions: int,
        holder_sets: list[tuple[int, ...]],
        device: torch.device | None = None,
        check: bool = True,
    ) -> PipelineGroups:
        """p2p: for stage boundary s -> s+1 of each direction, an "act" stream (s to s+1) and a
        "grad" stream (s+1 to s), one group each; keyed by (kind, direction, s) where s is the
        lower stage. sync: per holder set, one group over all data shards (replicated parameters)
        and one per EP rank (expert shards).

        Every rank calls `new_group` for every group, its own or not, in one order fixed by the
        topology alone (never by the rank): NCCL splits each communicator from the world's with
        all ranks taking part. With `check` every group then runs `check_groups` (world first)
        on `device`, before any step."""
        t = topology
        me_p, me_d, me_e = t.coords(rank)
        made: list[tuple[str, tuple[int, ...], Any]] = [("world", tuple(range(t.world)), None)]

        def new_group(name: str, ranks: list[int]):
            ranks_t = tuple(sorted(ranks))
            g = dist.new_group(list(ranks_t))
            made.append((name, ranks_t, g))
            return g

        def pp_rank_of(stage: int, direction: int) -> int:
            return stage if direction == 0 else t.pp - 1 - stage

        ep: dict[int, Any] = {direction: None for direction in range(directions)}
        ep_groups: list[tuple[tuple[int, ...], Any]] = []  # creation order, every rank's
        links: list[tuple[int, int, Any]] = []  # (src, dst, group) of every stream, creation order
        if t.ep > 1:
            for p in range(t.pp):
                for d in range(t.dp):
                    for direction in range(directions):
                        g = new_group(
                            f"ep(pp={p},dp={d},dir={direction})",
                            [t.rank(p, d, e) for e in range(t.ep)],
                        )
                        ep_groups.append((tuple(t.rank(p, d, e) for e in range(t.ep)), g))
                        if (p, d) == (me_p, me_d):
                            ep[direction] = g
        p2p: dict[tuple[str, int, int], tuple[Any, int, int]] = {}
        for d in range(t.dp):
            for e in range(t.ep):
                for direction in range(directions):
                    for s in range(t.pp - 1):
                        lo = t.rank(pp_rank_of(s, direction), d, e)
                        hi = t.rank(pp_rank_of(s + 1, direction), d, e)
                        for kind, src, dst in (("act", lo, hi), ("grad", hi, lo)):
                            g = new_group(
                                f"{kind}(dir={direction},s={s},dp={d},ep={e})", [src, dst]
                            )
                            links.append((src, dst, g))
                            if (d, e) == (me_d, me_e):
                                p2p[(kind, direction, s)] = (g, src, dst)
        sync: dict[tuple[tuple[int, ...], bool], Any] = {}
        for holders in sorted(set(holder_sets)):
            ranks = sorted(
                t.rank(p, d, e) for p in holders for d in range(t.dp) for e in range(t.ep)
            )
            g = new_group(f"sync{holders}", ranks) if len(ranks) > 1 else None
            if me_p in holders:
                sync[(holders, False)] = g
            for e in range(t.ep):
                ranks = sorted(t.rank(p, d, e) for p in holders for d in range(t.dp))
                g = new_group(f"sync{holders}-experts(ep={e})", ranks) if len(ranks) > 1 else None
                if me_p in holders and e == me_e:
                    sync[(holders, True)] = g
        if check and t.world > 1:
            dev = torch.device("cpu") if device is None else device
            check_groups(made, rank, t.world, dev)
            warm_links(links, ep_groups, rank, dev)
        return PipelineGroups(topology, rank, ep, p2p, sync, made)


def reserve_device_memory(
    device: torch.device,
    large_fraction: float = 0.5,
    small_fraction: float = 0.05,
    streams: list | None = None,
) -> tuple[int, int]:
    """Grow the CUDA allocator's cache now so that no step has to ask the driver for memory.

    A cudaMalloc is an implicit synchronization (CUDA C Programming Guide, "Implicit
    Synchronization"): the host waits until the GPU idles (H200: a 768 MiB allocation in one
    thread waited 951 ms for another stream's 1 s kernel, tests/gpu/test_reserve_memory_gpu.py).
    Mid-step the GPU does not idle while a posted NCCL receive spins for a message its peer has
    not sent, and if the peer is stuck the same way neither rank moves again (one rank's
    allocation waiting for a GPU that spins on its EP peer, which waits in an allocation of its
    own: benchmarks/notes-train.md). Pipeline workers use the stream-ordered allocator
    (`CUDA_ENV`), whose allocations do not synchronize; this keeps torch's native allocator safe
    too. The native allocator reuses a freed block only on the stream that allocated it, so the
    cache is grown on each of `streams` (default: the current stream), `large_fraction` of the
    free memory in all as one block per stream (tensors over 1 MiB are split from it) and
    `small_fraction` as 2 MiB small-pool segments (tensors up to 1 MiB: per-expert scales,
    indices, short activations). Returns the two sizes in bytes, all streams together."""
    if device.type != "cuda":
        return 0, 0
    if not (
        0 < large_fraction < 1 and 0 <= small_fraction < 1 and large_fraction + small_fraction < 1
    ):
        raise ValueError(
            f"large_fraction={large_fraction}, small_fraction={small_fraction}: "
            f"each in [0, 1) and together under 1"
        )
    streams = list(streams) if streams else [torch.cuda.current_stream(device)]
    free, _ = torch.cuda.mem_get_info(device)
    large = int(free * large_fraction / len(streams)) // (2 << 20) * (2 << 20)
    small_segments = int(free * small_fraction / len(streams)) // (2 << 20)
    for stream in streams:
        with torch.cuda.stream(stream):
            block = torch.empty(large, dtype=torch.uint8, device=device)
            # two 1 MiB tensors fill one 2 MiB small-pool segment
            smalls = [
                torch.empty(1 << 20, dtype=torch.uint8, device=device)
                for _ in range(2 * small_segments)
            ]
            del block, smalls  # back to the allocator's cache for this stream, not to the driver
    return large * len(streams), small_segments * (2 << 20) * len(streams)
