"""The two actors of `moeray bench kv` (serve/kv_bench.py) and what they move.

Legend: L cached layers, T tokens, C kv_lora_rank, R qk_rope_head_dim (see engine/disagg.py).

`KVBenchPeer` is the prefill or the decode side: it holds a transport's real Sender / Receiver
and, as the raw floor, one rank of a bare torch.distributed pair (`P2PPeer`). The payload of
every transfer is a per-iteration pattern (`make_rows`) that the decode side checks for exact
equality (`verify`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import torch

from moeray.platform.engine.disagg import KVRows
from moeray.platform.serve.kv_transport.base import backend_for
from moeray.platform.serve.kv_transport.factory import TRANSPORTS, make_receiver, make_sender
from moeray.platform.serve.kv_transport.p2p import P2PPeer

V3_LAYERS, V3_KV_LORA_RANK, V3_ROPE_DIM = 61, 512, 64
MIN_TIMED = 3  # the per-cell time budget never cuts a cell below this many timed transfers
# Order of the default run: the fast path first, RDT last (it needs Ray's NCCL collective group on
# CUDA and is the likeliest to fail; a failing transport is recorded and the run goes on).
DEFAULT_TRANSPORTS = ("channel", "object_store", "rdt")


@dataclass(frozen=True)
class KVBenchConfig:
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (nccl; needs 2 GPUs)
    tokens: tuple[int, ...] = (16, 128)
    layers: int = 4
    kv_lora_rank: int = V3_KV_LORA_RANK
    rope_dim: int = V3_ROPE_DIM
    transports: tuple[str, ...] = DEFAULT_TRANSPORTS
    warmup: int = 3
    iters: int = 20
    budget_s: float = 20.0  # per (transport, T): stop timing after this, once MIN_TIMED are in
    timeout_s: float = 60.0  # per transfer, and the transports' own rendezvous/collective timeout
    raw_tiny_bytes: int = 4  # the tiny ping subtracted from the raw ping-pong (one float32)
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: accepted cpu, cuda")
        if (
            not self.tokens
            or any(t < 1 for t in self.tokens)
            or len(set(self.tokens)) != len(self.tokens)
        ):
            raise ValueError(
                f"tokens={self.tokens}: need at least one size, each >= 1, none repeated"
            )
        if min(self.layers, self.kv_lora_rank, self.rope_dim) < 1:
            raise ValueError(
                f"layers={self.layers}, kv_lora_rank={self.kv_lora_rank}, "
                f"rope_dim={self.rope_dim} must all be >= 1"
            )
        bad = [t for t in self.transports if t not in TRANSPORTS]
        if bad or not self.transports or len(set(self.transports)) != len(self.transports):
            raise ValueError(
                f"transports={self.transports}: give each of {TRANSPORTS} at most once"
            )
        if self.warmup < 1 or self.iters < 1:
            # warm-up >= 1: the first transfer of a transport sets up its channel / relay pair.
            raise ValueError(f"warmup={self.warmup} and iters={self.iters} must be >= 1")
        if self.budget_s <= 0 or self.timeout_s <= 0:
            raise ValueError(f"budget_s={self.budget_s} and timeout_s={self.timeout_s} must be > 0")
        if self.raw_tiny_bytes < 1:
            raise ValueError(f"raw_tiny_bytes={self.raw_tiny_bytes} must be >= 1")

    def nbytes(self, tokens: int) -> int:
        return (
            self.layers
            * tokens
            * (self.kv_lora_rank + self.rope_dim)
            * torch.finfo(self.dtype).bits
            // 8
        )


# The payload: a per-iteration pattern, exact in bf16.
def pattern(
    shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Integers in [0, 255] (exact in bf16's 8 significant bits), period 251 * 241 = 60491
    elements along the flattened tensor, offset by 17 * seed mod 256 (period 256 in seed; a run's
    seeds are 2 * iteration and 2 * iteration + 1, so kv vs rope rows and any of the last 127
    iterations' rows differ from it, as does a shifted or truncated copy)."""
    n = 1
    for s in shape:
        n *= s
    i = torch.arange(n, dtype=torch.int32, device=device)
    # Reduced first so int32 never overflows (250 * 131 + 240 * 7 + 17 * 255 < 2^16).
    v = ((i % 251) * 131 + (i % 241) * 7 + 17 * (seed % 256)) % 256
    return v.to(dtype).view(shape)


def make_rows(
    layers: int,
    tokens: int,
    kv_lora_rank: int,
    rope_dim: int,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
) -> KVRows:
    return KVRows(
        seed,
        pattern((layers, tokens, kv_lora_rank), 2 * seed, dtype, device),
        pattern((layers, tokens, rope_dim), 2 * seed + 1, dtype, device),
    )


def verify(
    rows: KVRows,
    layers: int,
    tokens: int,
    kv_lora_rank: int,
    rope_dim: int,
    seed: int,
    dtype: torch.dtype,
    label: str,
) -> None:
    """Raise RuntimeError unless `rows` are exactly the rows `make_rows(..., seed)` built."""
    if rows.start != seed:
        raise RuntimeError(f"{label}: rows start at {rows.start}, sent {seed}")
    for name, got, width, s in (
        ("kv", rows.kv_LTC, kv_lora_rank, 2 * seed),
        ("rope", rows.pe_LTR, rope_dim, 2 * seed + 1),
    ):
        shape = (layers, tokens, width)
        if tuple(got.shape) != shape or got.dtype != dtype:
            raise RuntimeError(
                f"{label}: {name} rows {tuple(got.shape)} {got.dtype}, sent {shape} {dtype}"
            )
        want = pattern(shape, s, dtype, got.device)
        if not torch.equal(got, want):
            bad = int((got != want).sum())
            raise RuntimeError(
                f"{label}: {name} rows differ from those sent in {bad} of {want.numel()} values"
            )


def request_id(seed: int) -> str:
    """The request id of a transfer: both sides derive it from the seed, as the prefill and
    decode replicas share a request's id in Serve."""
    return f"kv-bench-{seed}"


async def _within(aw: Any, timeout_s: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(aw, timeout_s)
    except TimeoutError:
        raise TimeoutError(f"{what} after {timeout_s} s") from None


class KVBenchPeer(P2PPeer):
    """Prefill (rank 0 of the raw pair) or decode (rank 1: hosts the raw pair's TCPStore) side."""

    def __init__(self, role: str, cfg: KVBenchConfig) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"role={role!r}: accepted prefill, decode")
        # In each actor Ray makes its one GPU cuda:0 (CUDA_VISIBLE_DEVICES).
        device = "cuda:0" if cfg.device == "cuda" else "cpu"
        super().__init__(0 if role == "prefill" else 1, backend_for(device), device, cfg.timeout_s)
        self.role, self.cfg = role, cfg
        self._senders: dict[str, Any] = {}
        self._receivers: dict[str, Any] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def where(self) -> dict[str, Any]:
        import os
        import socket

        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
        }

    # prefill side
    async def open_sender(self, transport: str) -> None:
        self._senders[transport] = make_sender(transport, self.device, timeout_s=self.cfg.timeout_s)

    async def send_one(self, transport: str, tokens: int, seed: int, dest: Any) -> tuple[Any, int]:
        c = self.cfg
        rows = make_rows(c.layers, tokens, c.kv_lora_rank, c.rope_dim, seed, c.dtype, self.device)
        self._sync()  # building the rows is not part of the transfer
        t0 = time.monotonic_ns()
        ticket = await self._senders[transport].send(request_id(seed), rows, dest)
        return ticket, t0

    async def close_sender(self, transport: str) -> None:
        import ray

        sender = self._senders.pop(transport, None)
        if sender is None:
            return
        relays = [a for src, dst, _ in getattr(sender, "_pairs", {}).values() for a in (src, dst)]
        sender.close()
        for relay in relays:  # RDTSender.close leaves its relays alive (each holds 0.01 GPU)
            ray.kill(relay)

    # decode side
    async def open_receiver(self, transport: str) -> None:
        self._receivers[transport] = make_receiver(
            transport, "kv-bench-decode", self.device, timeout_s=self.cfg.timeout_s
        )

    async def run_cell(
        self, prefill: Any, transport: str, tokens: int, seed0: int
    ) -> dict[str, Any]:
        """Warm-up plus timed transfers of T-token rows from `prefill`, as the decode side sees
        them; every transfer verified. Returns seconds per timed transfer."""
        c = self.cfg
        recv = self._receivers[transport]
        dest = recv.endpoint()
        transfer_s, with_reply_s, call_s = [], [], []
        moved = early_n = before_reply = 0
        timed_since = None
        for i in range(c.warmup + c.iters):
            seed = seed0 + i
            t_call = time.monotonic_ns()
            label = f"{transport} at T={tokens}, iteration {i}"
            # As DecodeWorker.generate: expect (the channel posts its receive once the prefill
            # publishes the ticket in our store; the others return None) right before the call.
            early = recv.expect(request_id(seed))
            ready_ns: list[int] = []
            if early is not None:

                def stamp(f, ready_ns=ready_ns) -> None:  # on the receive thread, as the rows land
                    if not f.cancelled() and f.exception() is None:
                        self._sync()
                        ready_ns.append(time.monotonic_ns())

                early.add_done_callback(stamp)
            try:
                ticket, t0 = await _within(
                    prefill.send_one.remote(transport, tokens, seed, dest),
                    c.timeout_s,
                    f"{label}: no ticket from the prefill side",
                )
            except BaseException:
                recv.cancel(request_id(seed))
                raise
            before_reply += int(early is not None and early.done() and i >= c.warmup)
            rows = await _within(recv.receive(ticket), c.timeout_s, f"{label}: ticket not redeemed")
            if rows.kv_LTC.device != self.device or rows.pe_LTR.device != self.device:
                rows = rows.to(self.device)  # timed: the decode side needs them on its device
                moved += 1
            self._sync()
            t1 = time.monotonic_ns()
            verify(rows, c.layers, tokens, c.kv_lora_rank, c.rope_dim, seed, c.dtype, label)
            del rows
            if i < c.warmup:
                continue
            # Rows received on the store (queue) notice: when they landed; else once `receive`
            # returned. ready_ns is complete here: the stamp runs before the future wakes `receive`.
            transfer_s.append(((ready_ns[0] if ready_ns else t1) - t0) / 1e9)
            early_n += bool(ready_ns)
            with_reply_s.append((t1 - t0) / 1e9)
            call_s.append((t1 - t_call) / 1e9)
            timed_since = timed_since or t_call
            if (
                len(transfer_s) >= MIN_TIMED
                and (time.monotonic_ns() - timed_since) / 1e9 > c.budget_s
            ):
                break
        return {
            "transfer_s": transfer_s,
            "with_reply_s": with_reply_s,
            "call_s": call_s,
            "verified": c.warmup + len(transfer_s),
            "moved_to_device": moved,
            "early": early_n,
            "rows_before_reply": int(before_reply),
        }

    async def close_receiver(self, transport: str) -> None:
        recv = self._receivers.pop(transport, None)
        if recv is not None:
            recv.close()
