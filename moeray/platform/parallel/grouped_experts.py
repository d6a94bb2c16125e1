"""The grouped layout of the routed experts' rows (`GroupedExperts`): every expert's rows in one
grouped GEMM per projection, each expert's rows starting aligned (16 rows for BF16's
torch._grouped_mm on CUDA, 128 for the FP8 grouped GEMM), planned on the host from a list of
counts or on the device from a tensor of them; and `use_grouped_wgrad`, the one choice of its
weight gradients' kernel. Used by `experts_mlp.py` (the experts' autograd node) and, through
`experts_mlp.experts_layout`, by the model's permute and combine, which write and read the
layout directly.

Legend: A rows sorted by expert, P rows of the padded layout, E experts, N and K a GEMM's output
and input widths.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from moeray.kernels.common import switched_off
from moeray.kernels.grouped_wgrad import grouped_wgrad


def use_grouped_wgrad(device: torch.device) -> bool:
    """Whether `GroupedExperts.wgrad` runs the Triton k-grouped GEMM (`kernels/grouped_wgrad.py`:
    fp32 sums written as fp32, or added into the fp32 gradient in its epilogue) instead of
    `torch._grouped_mm` (bf16 out), a cast to fp32 and autograd's add (profiled: ~160 ms of casts
    and adds in a 0.7 s one-H200 Moonlight step). On CUDA, in a process alone (the FP8 k-grouped
    GEMM hung the 4-GPU pipeline's first step, cause not found: benchmarks/notes-train.md;
    `train/replica.py` keeps that one to one rank too), unless MOERAY_FUSED_GROUPED_WGRAD=0. CPU
    keeps torch's GEMM."""
    alone = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1
    return device.type == "cuda" and alone and not switched_off("GROUPED_WGRAD")


class GroupedExperts:
    """All experts' rows in one grouped GEMM (`torch._grouped_mm`: CUTLASS on sm90 for bf16, a
    per-group loop on CPU): one launch per projection instead of one per expert; the weight
    gradients one k-grouped launch per projection too (`wgrad`). On CUDA each expert's rows start
    at a multiple of ALIGN (zero rows between), the grouped kernel's alignment; on CPU the rows
    stay as they are."""

    ALIGN = 16

    @staticmethod
    def available(device: torch.device, fp8: bool, act: torch.dtype | None) -> bool:
        """Whether experts with these settings run their GEMMs grouped. FP8 keeps its own GEMMs
        (torch's grouped FP8 GEMM scales per row, not in 1x128 / 128x128 blocks); on CUDA the
        grouped kernel takes bf16 only."""
        return (
            not fp8
            and hasattr(torch, "_grouped_mm")
            and (act == torch.bfloat16 if device.type == "cuda" else device.type == "cpu")
        )

    @staticmethod
    def applies(x: torch.Tensor, fp8: bool, act: torch.dtype) -> bool:
        return x.shape[0] > 0 and GroupedExperts.available(x.device, fp8, act)

    @staticmethod
    def device_layout(
        x_AD: torch.Tensor, *, fp8: bool, kgrouped_wgrad: bool, bf16_wgrad: bool = False
    ) -> bool:
        """Whether a grouped path (BF16 `GroupedExperts`, or `experts_fp8.GroupedFP8` with `fp8`)
        keeps rows given as a device tensor there (`__init__` plans on the device). On CUDA only (on
        the CPU reading them makes nothing wait), where every weight gradient takes its row
        ranges from the device ends `offs`: BF16 where `use_grouped_wgrad`, FP8 with
        `kgrouped_wgrad` (`fp8_gemm_kgrouped`), FP8 with `bf16_wgrad` as BF16; FP8's per-expert
        ones slice on the host."""
        if not x_AD.is_cuda:
            return False
        if fp8 and not bf16_wgrad:
            return kgrouped_wgrad
        return use_grouped_wgrad(x_AD.device)

    @staticmethod
    def default_align(device: torch.device) -> int:
        """The BF16 layout's alignment: ALIGN on CUDA (torch._grouped_mm's), 1 on the CPU (the
        rows stay as they are)."""
        return GroupedExperts.ALIGN if device.type == "cuda" else 1

    @classmethod
    def from_counts(cls, counts_E: torch.Tensor, A: int, align: int) -> GroupedExperts:
        """The layout of A rows sorted by expert, counts_E (int64 [E]) per expert on the device,
        planned there (`_device_plan`) before the rows exist: what `experts_layout` gives the
        model to permute into."""
        grp = cls.__new__(cls)
        grp.rows, grp.device, grp.align = counts_E, counts_E.device, align
        grp._device_plan(A, counts_E, align)
        return grp

    def __init__(
        self, x_AD: torch.Tensor, rows: list[int] | torch.Tensor, align: int | None = None
    ) -> None:
        self.rows, self.device = rows, x_AD.device
        self.padded: list[int] | None
        self.align = align = align or self.default_align(x_AD.device)
        if isinstance(rows, torch.Tensor):
            self._device_plan(x_AD.shape[0], rows, align)
            return
        self.padded = padded = [-(-n // align) * align for n in rows]
        ends = torch.tensor(padded).cumsum(0)
        self.P = int(ends[-1]) if len(rows) else 0
        self._ends = ends
        if align == 1:
            self.dst_A = None
        else:  # padded position of each row: its expert's padded start + its rank within the expert
            starts = [0, *ends.tolist()[:-1]]
            self.dst_A = _to_device(
                torch.cat([torch.arange(s, s + n) for s, n in zip(starts, rows, strict=True)]),
                x_AD.device,
            )

    def _device_plan(self, A: int, counts_E: torch.Tensor, align: int) -> None:
        """The padded layout of A rows from per-expert counts on the device, with no host sync:
        P is a bound instead of the exact size, and rows past the last expert's end belong to no
        expert (zeros in `pad` and in the model's permute and combine-backward outputs; whatever
        torch._grouped_mm leaves there, zeros from the FP8 grouped GEMM, whose `block_expert` is
        -1 there): the grouped GEMMs, `grouped_wgrad` and `fp8_gemm_kgrouped` read each expert's
        rows only, and neither `unpad` nor the model's combine reads them. One host sync per MoE
        layer and micro-batch less, each of which let the GPU run dry while the host caught
        up."""
        E = counts_E.shape[0]
        counts = counts_E.to(torch.int64)
        padded = (counts + (align - 1)) // align * align
        self._ends = ends = padded.cumsum(0)
        self.padded = None  # on the device; the per-expert FP8 weight gradients need a list
        # Each expert pads by at most align - 1, so the exact size, a multiple of align, is at
        # most A + E (align - 1) rounded down to one (P % 128 == 0 for the FP8 grouped GEMM).
        # A = 4096, E = 64, align 128: P = 12,160, the exact size of 63 experts of 1 row and
        # one of 4033 (at least 4096).
        self.P = (A + E * (align - 1)) // align * align
        if align == 1:
            self.dst_A = None
            return
        expert_A = torch.repeat_interleave(
            torch.arange(E, device=counts.device), counts, output_size=A
        )
        shift_E = (ends - padded) - (counts.cumsum(0) - counts)  # padded start - packed start
        self.dst_A = torch.arange(A, device=counts.device) + shift_E[expert_A]

    def block_expert(self, block: int = 128) -> torch.Tensor:
        """int32 [P / block] on the device: the expert of each `block`-row block of the padded
        layout, -1 for the blocks past the last expert's end (a device-planned layout's tail).
        Needs `block` to divide the alignment (no block straddles two experts)."""
        if self.align % block:
            raise ValueError(
                f"GroupedExperts: {block}-row blocks of a layout aligned to {self.align} rows "
                "would straddle experts"
            )
        if self.padded is not None:
            ids = [e for e, p in enumerate(self.padded) for _ in range(p // block)]
            return _to_device(torch.tensor(ids, dtype=torch.int32), self.device)
        # Device ops only (no .tolist(), nonzero or masked indexing: each waits for the GPU):
        # the block at row r is the first expert whose padded end is past r (experts without
        # rows are passed over), none past the last end.
        ends, E = self._ends, self._ends.shape[0]
        starts = torch.arange(0, self.P, block, device=ends.device)
        first_past = torch.searchsorted(ends, starts, right=True)
        return torch.where(first_past < E, first_past, -1).to(torch.int32)

    def padded_segments(self):
        """(expert, slice of its padded rows) for every expert with rows."""
        if self.padded is None:
            raise ValueError(
                "GroupedExperts: this layout was planned on the device (rows as a "
                "tensor); per-expert slices need rows as a list"
            )
        return row_segments(self.padded)

    def pad(self, t_A: torch.Tensor) -> torch.Tensor:
        """t on the layout: row a at dst_A[a], zeros elsewhere (a memset and an index_copy_)."""
        if self.dst_A is None:
            return t_A
        return t_A.new_zeros(self.P, t_A.shape[1]).index_copy_(0, self.dst_A, t_A)

    def unpad(self, t_P: torch.Tensor) -> torch.Tensor:
        """The rows of t that `pad` placed, in sorted order (an index_select)."""
        return t_P if self.dst_A is None else t_P.index_select(0, self.dst_A)

    @functools.cached_property
    def offs(self) -> torch.Tensor:
        """int32 end row of each expert on the device: torch._grouped_mm's offsets (made on first
        use: the grouped FP8 path indexes blocks instead)."""
        return _to_device(self._ends.to(torch.int32), self.device)

    def mm(self, a_P: torch.Tensor, b_E: torch.Tensor) -> torch.Tensor:
        """Rows of expert e times b_E[e] ([E, K, N]) -> [P, N]."""
        return torch._grouped_mm(a_P, b_E, offs=self.offs)

    def wgrad(
        self,
        dy_PN: torch.Tensor,
        x_PK: torch.Tensor,
        dtype: torch.dtype,
        *,
        accumulate_into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """dW [E, N, K] in `dtype`: dW[e] = dy[rows of e]^T x[rows of e], exact zeros for experts
        without rows. `accumulate_into` (fp32 contiguous [E, N, K], a gradient): += dW, returned.

        Where `use_grouped_wgrad`: `grouped_wgrad`, summed and written in fp32, added in its
        epilogue. Else `torch._grouped_mm` (bf16 out on CUDA), cast to `dtype`, empty experts
        zeroed here (not left to the kernel's handling of empty groups)."""
        if use_grouped_wgrad(self.device):
            dw = grouped_wgrad(dy_PN, x_PK, self.offs, accumulate_into=accumulate_into)
            return dw if accumulate_into is not None else dw.to(dtype)
        dw = torch._grouped_mm(dy_PN.t(), x_PK, offs=self.offs).to(dtype)
        if isinstance(self.rows, torch.Tensor):
            dw.masked_fill_((self.rows == 0)[:, None, None], 0)  # no host sync
        else:
            empty = [e for e, n in enumerate(self.rows) if n == 0]
            if empty:
                dw[empty] = 0
        return dw if accumulate_into is None else accumulate_into.add_(dw)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t (built on the host, or already on `device`) on `device` without making the host wait:
    from pageable memory a non_blocking copy may still wait for the stream (the driver stages
    it), so CUDA copies go through pinned memory (PyTorch's caching host allocator: no
    cudaHostAlloc once warm)."""
    if t.device == device:
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def row_segments(rows: list[int]):
    """(expert, slice of its rows) for every expert with rows, in expert order."""
    start = 0
    for e, n in enumerate(rows):
        if n:
            yield e, slice(start, start + n)
        start += n
