"""The pipeline executor: one rank's ops of a schedule (`schedule.py`: 1F1B, ZB1P, DualPipe) for
one step, with torch.distributed point-to-point messages on the streams of
`distributed.PipelineGroups`.

Legend: b sequences of a micro-batch, S positions, D model width, M micro-batches of a step (both
DualPipe directions together), E routed experts, L MoE layers.

Messages. A slot's receives are all posted when the slot starts, not earlier: on NCCL a posted
receive is a kernel spinning on the GPU until its message comes, and any implicit device
synchronization on the host (a cudaMalloc, a module load) waits for it. Posted a slot early, it
can wait for a message the peer sends only after this rank's current slot, and with both ranks so
the GPUs never idle. Posted at slot start, it waits only for what the schedule needs now, sent in
an earlier slot of the peer. Sends are asynchronous and waited for at the end of the step, so no
rank blocks on a peer that is itself waiting to receive. Each message is a batch of one through
`dist.batch_isend_irecv`, which on NCCL runs on its stream's own communicator (`distributed.py`,
"Streams").

Overlap (CUDA). Each direction computes on its own CUDA stream and uses its own EP process group.
A DualPipe F&B slot pairs a forward of one direction with a backward of the other; with
`overlap=True` the two run in two host threads, so one chunk's all-to-all (and its p2p messages)
proceed while the other chunk computes. Two directions never share a collective, so the EP ranks'
collectives stay matched whatever the interleaving. On CPU/gloo the slot runs sequentially unless
asked (the tests run the threaded path on gloo too).
"""

from __future__ import annotations

import contextlib
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moeray.platform import fp8 as f8
from moeray.platform.model.moe import Experts
from moeray.platform.parallel.distributed import PipelineGroups, reserve_device_memory
from moeray.platform.parallel.grouped_experts import GroupedExperts
from moeray.platform.parallel.schedule import Kind, Op, Schedule, Slot, validate
from moeray.platform.parallel.stages import PipelineStage
from moeray.platform.parallel.weight_grad import SplitLinear, prewarm_matmuls


@dataclass
class OpTiming:
    kind: str  # "F", "B", "BI", "W" or "F&B"
    start: float  # seconds from the step's start: inputs received, compute begins
    end: float  # compute done (sends posted)


@dataclass
class StepTimings:
    wall: float  # seconds from the step's start (after a barrier) to this rank's last op
    slots: list[OpTiming] = field(default_factory=list)

    @property
    def busy(self) -> float:
        return sum(s.end - s.start for s in self.slots)

    @property
    def idle(self) -> float:
        return max(self.wall - self.busy, 0.0)

    def mean_cost(self, kind: str) -> float | None:
        xs = [s.end - s.start for s in self.slots if s.kind == kind]
        return sum(xs) / len(xs) if xs else None


@dataclass
class StepOutput:
    main_sum: float  # sum over this rank's last-stage micro-batches of CE / M
    mtp_sum: float
    balance_sum: float  # sum over this rank's stages and micro-batches of the balance loss / M
    loads_LE: torch.Tensor  # int64 tokens per expert, this rank's layers, all its micro-batches
    timings: StepTimings


def _slot_kind(slot: Slot) -> str:
    return "F&B" if len(slot) == 2 else slot[0].kind.value


def _recv_id(op: Op) -> tuple[int, int, int, bool]:
    """An op's receive: its (direction, mb, stage) and whether a forward (activation) or a
    backward (gradient) receives it."""
    return (*op.key, op.kind == Kind.F)


class PipelineExecutor:
    """Runs one rank's ops of `schedule` for one step.

    `stages[(direction, stage)]` are this rank's stage modules; `groups.p2p` the message streams.
    """

    def __init__(
        self,
        schedule: Schedule,
        pp_rank: int,
        stages: dict[tuple[int, int], PipelineStage],
        groups: PipelineGroups,
        *,
        device: torch.device,
        act_dtype: torch.dtype,
        seq_len: int,
        hidden: int,
        autocast_dtype: torch.dtype | None = None,
        overlap: bool | None = None,
        time_ops: bool = True,
    ) -> None:
        validate(schedule)
        self.schedule, self.pp_rank, self.stages, self.groups = schedule, pp_rank, stages, groups
        need = {
            (d, st)
            for st in schedule.stages_of(pp_rank)
            for d in range(schedule.directions)
            if schedule.rank_of(st, d) == pp_rank
        }
        if set(stages) != need:
            raise ValueError(
                f"rank {pp_rank} needs stages {sorted(need)} (direction, stage), "
                f"got {sorted(stages)}"
            )
        self.device, self.act_dtype = device, act_dtype
        self.seq_len, self.hidden = seq_len, hidden
        self.autocast_dtype = autocast_dtype
        self.cuda = device.type == "cuda"
        self.overlap = self.cuda if overlap is None else overlap
        self.time_ops = time_ops
        # one CUDA stream per direction: a forward of one overlaps a backward of the other
        self.streams = (
            {d: torch.cuda.Stream(device) for d in range(schedule.directions)} if self.cuda else {}
        )
        self._pool: ThreadPoolExecutor | None = None
        self._rehearsed = False  # on CPU too: cheap, and the gloo tests then cover it

    # -- helpers --------------------------------------------------------------------------------

    def _stream(self, direction: int):
        return torch.cuda.stream(self.streams[direction]) if self.cuda else contextlib.nullcontext()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _recv_key(self, op: Op) -> tuple[str, int, int] | None:
        """The stream an op receives from: (kind, direction, lower stage of the boundary)."""
        d, _, st = op.key
        if op.kind == Kind.F:
            return ("act", d, st - 1) if st > 0 else None
        if op.kind in (Kind.B, Kind.BI):
            return ("grad", d, st) if st < self.schedule.pp - 1 else None
        return None

    def _post_recv(self, op: Op) -> None:
        key = self._recv_key(op)
        if key is None or _recv_id(op) in self._recvs:
            return
        group, src, _ = self.groups.p2p[key]
        with self._stream(op.direction):
            buf = torch.empty(
                self._mb_rows, self.seq_len, self.hidden, dtype=self.act_dtype, device=self.device
            )
            # a batch of one: on NCCL it runs on the group's own communicator
            # (distributed.py, "Streams")
            (work,) = dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, src, group)])
        self._recvs[_recv_id(op)] = [buf, work]

    def _wait_recv(self, op: Op) -> None:
        """Wait once for an op's receive (a gloo Work must not be waited on twice); on CUDA this
        makes the direction's stream, not the host, wait for it. Only that op waits: a host wait
        for both inputs of an F&B slot deadlocks DualPipe, since one op's input can come from a
        peer's op that needs this rank's other op first (benchmarks/notes-train.md)."""
        entry = self._recvs.get(_recv_id(op))
        if entry is not None and entry[1] is not None:
            with self._stream(op.direction):
                entry[1].wait()
            entry[1] = None

    def _take_recv(self, op: Op) -> torch.Tensor:
        """The op's received input, in the op's own thread. On CUDA the host waits for it too:
        the op's thousands of launches are then never queued behind a receive that spins until a
        peer sends. Queued so, they can fill the launch queue; the other direction's thread then
        blocks in its next launch, and the message that would free the peer is never sent
        (benchmarks/notes-train.md)."""
        self._wait_recv(op)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return self._recvs.pop(_recv_id(op))[0]

    def _send(self, key: tuple[str, int, int], tensor: torch.Tensor) -> None:
        group, _, dst = self.groups.p2p[key]
        if tensor.dtype != self.act_dtype:
            raise ValueError(f"stage boundary sends {tensor.dtype}, expected {self.act_dtype}")
        tensor = tensor.detach().contiguous()
        (work,) = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, dst, group)])
        self._sends.append((tensor, work))

    # -- ops ------------------------------------------------------------------------------------

    def _forward(self, op: Op) -> None:
        d, mb, st = op.key
        stage = self.stages[(d, st)]
        x = None
        if st > 0:
            x = self._take_recv(op).requires_grad_()
        g = d * self.schedule.microbatches_per_direction() + mb
        tokens = self._micro[g]
        with self._autocast():
            out, aux, stats = stage.forward_chunk(
                x, tokens, self.loss_cfg, 1.0 / self.schedule.microbatches
            )
        self._ctx[op.key] = (x, out, aux)
        for row, counts in stats.pop("loads"):
            self._loads[row] += counts.to(self._loads.device, torch.int64)
        for name, v in stats.items():
            self._stats[name] = self._stats[name] + v.float()
        if st < self.schedule.pp - 1:
            self._send(("act", d, st), out)

    def _backward(self, op: Op) -> None:
        d, _, st = op.key
        stage = self.stages[(d, st)]
        x, out, aux = self._ctx.pop(op.key)
        if st == self.schedule.pp - 1:
            tensors, grads = [out], [torch.ones_like(out)]
        else:
            tensors, grads = [out], [self._take_recv(op)]
            if aux.requires_grad:
                tensors.append(aux)
                grads.append(torch.ones_like(aux))
        with stage.store.collect(op.key, defer=op.kind == Kind.BI):
            torch.autograd.backward(tensors, grads)
        if st > 0:
            self._send(("grad", d, st - 1), x.grad)

    def _weight(self, op: Op) -> None:
        d, _, st = op.key
        self.stages[(d, st)].store.flush(op.key)

    def _run_op(self, op: Op) -> None:
        with self._stream(op.direction):
            {
                Kind.F: self._forward,
                Kind.B: self._backward,
                Kind.BI: self._backward,
                Kind.W: self._weight,
            }[op.kind](op)

    def _run_slot(self, slot: Slot) -> None:
        if len(slot) == 2 and self.overlap:
            # the forward in a helper thread (autocast and grad mode are thread-local: both are
            # set inside), the backward here; each on its direction's stream and EP group
            fwd, bwd = slot
            if self._pool is None:
                # the CUDA current device is per thread: a new thread starts on cuda:0, where
                # rank 1's allocations and NCCL calls do not belong
                init = functools.partial(torch.cuda.set_device, self.device) if self.cuda else None
                self._pool = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="pipeline-fwd", initializer=init
                )
            fut = self._pool.submit(self._run_op, fwd)
            self._run_op(bwd)
            fut.result()
        else:
            for op in slot:
                self._run_op(op)

    def rehearse(self) -> None:
        """Run every held stage's forward and both backward forms (full, and input-grad then
        deferred weight-grad) once on this step's first micro-batch, with no point-to-point message
        in flight, then drop the gradients. Kernels first launched here (Triton's JIT-compiled ones
        and any torch kernel still lazily loaded) load now: a module load may wait for the whole
        GPU, which deadlocks while a pre-posted NCCL receive spins on it waiting for a peer that is
        itself stuck the same way. EP all-to-alls inside the forwards still run: every EP rank of a
        pipeline rank holds the same stages and rehearses them in the same order."""
        tokens = self._micro[0]
        if self.cuda:
            self._prewarm_gemms()
        for (d, st), stage in sorted(self.stages.items()):
            for defer in (False, True):
                with self._stream(d):
                    x = None
                    if st > 0:
                        x = torch.zeros(
                            self._mb_rows,
                            self.seq_len,
                            self.hidden,
                            dtype=self.act_dtype,
                            device=self.device,
                            requires_grad=True,
                        )
                    with self._autocast():
                        out, aux, _ = stage.forward_chunk(x, tokens, self.loss_cfg, 1.0)
                    tensors, grads = [out], [torch.ones_like(out)]
                    if aux.requires_grad and st < self.schedule.pp - 1:
                        tensors.append(aux)
                        grads.append(torch.ones_like(aux))
                    key = (-1, -1, st)
                    with stage.store.collect(key, defer=defer):
                        torch.autograd.backward(tensors, grads)
                    stage.store.flush(key)
        for stage in self.stages.values():
            for p in stage.parameters():
                p.grad = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            reserve_device_memory(
                self.device,
                streams=[torch.cuda.current_stream(self.device), *self.streams.values()],
            )
        self._rehearsed = True

    def _prewarm_gemms(self) -> int:
        """Load the GEMM kernels of every token count a step can give any split linear layer here
        (FP8: `platform/fp8.py`'s padding note; else `weight_grad.matmul_forward` and the note
        above it). A routed expert receives at most one row per token of each EP rank's
        micro-batch: every padded count up to micro-batch tokens x EP; other layers always see the
        micro-batch's tokens. Returns the GEMMs run."""
        # (N, K, dtype) by (fp8, routed expert)
        weights: dict[tuple[bool, bool], set[tuple[int, int, torch.dtype]]] = {
            (f, e): set() for f in (True, False) for e in (True, False)
        }
        for stage in self.stages.values():
            for module in stage.modules():
                if isinstance(module, SplitLinear):
                    n, k = module.weight.shape
                    weights[(module.fp8, False)].add((n, k, module.weight.dtype))
                elif isinstance(module, Experts) and isinstance(module.linear, functools.partial):
                    fp8 = bool(module.linear.keywords.get("fp8"))
                    if GroupedExperts.available(
                        self.device, fp8, self.autocast_dtype or module.gate_proj.dtype
                    ):
                        continue  # one grouped GEMM per projection: nothing per token count to load
                    for w in (module.gate_proj, module.up_proj, module.down_proj):
                        weights[(fp8, True)].add((w.shape[1], w.shape[2], w.dtype))
        tokens = self._mb_rows * self.seq_len
        counts = {
            False: f8.padded_row_counts(tokens)[-1:],  # one count: the micro-batch's
            True: f8.padded_row_counts(tokens * self.groups.topology.ep),
        }
        runs = 0
        for (fp8, expert), ws in weights.items():
            if fp8:
                runs += f8.prewarm(ws, counts[expert], self.device)
            else:
                runs += prewarm_matmuls(ws, counts[expert], self.device, self.autocast_dtype)
        return runs

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # -- a step ---------------------------------------------------------------------------------

    def run(self, tokens_BS1: torch.Tensor, loss_cfg) -> StepOutput:
        """Forward and backward of all micro-batches of this pipeline's batch (gradients are left
        in the parameters' .grad, not yet synchronized across copies or data shards)."""
        M = self.schedule.microbatches
        B = tokens_BS1.shape[0]
        if B % M or tokens_BS1.shape[1] != self.seq_len + 1:
            raise ValueError(
                f"batch {tuple(tokens_BS1.shape)} must be [k*M, seq_len+1] with "
                f"M={M} micro-batches and seq_len={self.seq_len}"
            )
        self._mb_rows = B // M
        self._micro = tokens_BS1.to(self.device).split(self._mb_rows)
        self.loss_cfg = loss_cfg
        stage0 = next(iter(self.stages.values()))
        self._loads = torch.zeros(
            stage0.num_moe_layers,
            stage0.config.n_routed_experts,
            dtype=torch.int64,
            device=self.device,
        )
        zero = torch.zeros((), device=self.device)
        self._stats = {"main": zero, "mtp": zero, "balance": zero}
        self._ctx: dict = {}
        if not self._rehearsed:
            self.rehearse()
        self._recvs: dict = {}
        self._sends: list = []
        timings = StepTimings(0.0)
        events = []
        if self.cuda:
            for s in self.streams.values():
                s.wait_stream(torch.cuda.current_stream(self.device))
        ops = self.schedule.ranks[self.pp_rank]
        dist.barrier()  # the step's clock starts together on every rank
        t0 = time.perf_counter()
        for slot in ops:
            for op in slot:  # this slot's receives, none earlier (module docstring)
                self._post_recv(op)
            for op in slot:  # inputs of this slot: the compute clock starts once they are in
                self._wait_recv(op)
            if self.cuda and self.time_ops:
                ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for s in self.streams.values():
                    torch.cuda.current_stream(self.device).wait_stream(s)
                ev[0].record()
            start = time.perf_counter() - t0
            self._run_slot(slot)
            if self.cuda and self.time_ops:
                for s in self.streams.values():
                    torch.cuda.current_stream(self.device).wait_stream(s)
                ev[1].record()
                events.append(ev)
            timings.slots.append(OpTiming(_slot_kind(slot), start, time.perf_counter() - t0))
        for _, work in self._sends:
            work.wait()
        if self.cuda:
            for s in self.streams.values():
                torch.cuda.current_stream(self.device).wait_stream(s)
            torch.cuda.synchronize(self.device)
            if self.time_ops:
                # GPU time per slot from events; host timestamps only order them
                for t, (a, b) in zip(timings.slots, events, strict=True):
                    t.end = t.start + a.elapsed_time(b) / 1e3
        timings.wall = time.perf_counter() - t0
        assert not self._ctx and not self._recvs, "ops left without their backward or receive"
        left = [k for st in self.stages.values() for k in st.store.pending]
        assert not left, f"deferred weight grads never flushed: {left}"
        self._sends = []
        return StepOutput(
            float(self._stats["main"]) / M,
            float(self._stats["mtp"]) / M,
            float(self._stats["balance"]) / M,
            self._loads.cpu(),
            timings,
        )
