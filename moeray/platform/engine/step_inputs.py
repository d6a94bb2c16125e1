"""A step's inputs, built on the host and sent to the device: input ids with their start
positions, block tables, row indices. Each is one host->device copy and none waits for the GPU:
from pinned memory where `pin` (set by async scheduling, overlap.py: a copy from pageable memory
waits for the work already queued on the stream, the step in flight).

Legend: B sequences, S tokens per row, M pages per block table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moeray.platform.engine.kv_cache import KVCacheManager
from moeray.platform.engine.scheduler import PENDING


class StepInputs:
    """Builds the device tensors of a forward's inputs for the sequences of `kv`."""

    def __init__(
        self,
        kv: KVCacheManager,
        device: torch.device,
        max_pages: int,
        scratch_page: int | None,
    ) -> None:
        self.kv, self.device = kv, device
        self.page_size = kv.page_size
        self.max_pages = max_pages  # max_model_len's pages: the widest block table
        self.scratch_page = scratch_page  # where padded positions write (None: nothing padded)
        self.pin = False

    def ids_and_starts(self, ids: list[list[int]], starts: list[int]):
        """-> (ids_BS, starts_B) on the device through one host->device copy instead of two."""
        both = torch.tensor(
            [[*r, s] for r, s in zip(ids, starts, strict=True)],
            dtype=torch.long,
            pin_memory=self.pin,
        ).to(self.device, non_blocking=True)
        return both[:, :-1], both[:, -1]

    def device_index(self, rows: list[int]) -> torch.Tensor:
        """Row indices as an int64 tensor on the device (no sync)."""
        t = torch.tensor(rows, dtype=torch.long, pin_memory=self.pin)
        return t.to(self.device, non_blocking=True)

    def pages_to(self, end: int) -> int:
        """Block-table width that covers positions [0, end)."""
        M = -(-end // self.page_size)
        if M > self.max_pages:
            raise ValueError(
                f"positions up to {end - 1} need {M} pages, past max_model_len's "
                f"{self.max_pages} pages of {self.page_size}"
            )
        return M

    def tables_by_id(self, request_ids: Sequence[str], min_width: int = 0) -> torch.Tensor:
        """Block tables [B, M], M = the most pages any row holds (at least min_width). Columns past
        a row's own pages point at the scratch page, so a padded position there writes (and reads
        back) scratch, never another sequence's page; without a scratch page they repeat the row's
        first page, which only masked reads touch (nothing is padded then)."""
        rows = [self.kv.tables[r].pages for r in request_ids]
        M = max(max(len(r) for r in rows), min_width)
        # One host array, one host->device copy. numpy from the padded lists: at 64 rows of 64
        # pages (batch 64 at 4K context) 91 us a step on the CPU machine, where torch.tensor on
        # the nested lists took 252 (it converts element by element), on the decode step's path.
        fill = [r[0] if self.scratch_page is None else self.scratch_page for r in rows]
        padded = [[*r, *[f] * (M - len(r))] for r, f in zip(rows, fill, strict=True)]
        table = torch.from_numpy(np.array(padded, dtype=np.int32))
        if self.pin:
            table = table.pin_memory()
        return table.to(self.device, non_blocking=True)


def copy_to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying a device tensor to pinned host memory behind the work queued so far ->
    (the host tensor, the event after the copy: synchronize it before reading). On CPU: the
    tensor itself and None."""
    if not t.is_cuda:
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def known(ids: tuple[int, ...]) -> tuple[int, ...]:
    """Input ids with a PENDING id as 0: a valid embedding row, overwritten on the device."""
    return tuple(0 if t == PENDING else t for t in ids) if PENDING in ids else ids


def pad_ids(ids: Sequence[int], S: int) -> list[int]:
    """ids then its last token repeated up to S: any finite input will do, a padded row's outputs
    are cut off."""
    return list(ids) + [ids[-1]] * (S - len(ids))
