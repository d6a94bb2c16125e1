"""head_gemv compiled on the GPU (marker gpu; skipped without CUDA): MLA's two absorbed per-head
GEMMs (W_UK: K 128 -> N 512, N contiguous; W_UV: K 512 -> N 128, the K-contiguous transpose
view of [H, V, C]) at Moonlight-16B-A3B (16 heads) and DeepSeek-V3 (128 heads) widths, R = 1, 4
and 16 rows, against the fp32 einsum; one launch per call; a CUDA-graph replay; and the tiny
model's greedy tokens through the engine with MOERAY_FUSED_HEAD_GEMV=1 and unset; the opt-in
MOERAY_FUSED_HEAD_BMM=1 product past head_gemv's rows launching no copy after it."""

import os

import pytest
import torch

from tests.gpu.gemv_checks import captured, cuda_kernels, poison, tiny_greedy, within_rounding

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# fp32 Triton dots default to TF32 (the engine's other kernels): IEEE keeps fp32 paths comparable.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

HEADS = {"moonlight": 16, "v3": 128}
ROWS = (1, 4, 16)


def _weights(h: int, which: str, dtype=torch.bfloat16) -> torch.Tensor:
    """W_UK [H, 128, 512] (N contiguous) or W_UV as [H, 512, 128] (K contiguous), both views of
    one kv_b_proj weight [H * 256, 512] as MLA takes them."""
    g = torch.Generator(device="cuda").manual_seed(h)
    kv_b = torch.randn(h * 256, 512, device="cuda", generator=g).to(dtype)
    w_HKC = kv_b.view(h, 256, 512)
    return w_HKC[:, :128] if which == "uk" else w_HKC[:, 128:].transpose(1, 2)


def _x(r: int, h: int, k: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(r + h + k)
    x = torch.randn(r, h, k, device="cuda", generator=g)
    return (x * torch.logspace(-1, 1, r, device="cuda")[:, None, None]).to(dtype)


@pytest.mark.parametrize("which", ["uk", "uv"])
@pytest.mark.parametrize("model", sorted(HEADS))
@pytest.mark.parametrize("r", ROWS)
def test_head_gemv_mla_shapes(which, model, r):
    from moeray.kernels.head_gemv import head_gemv

    h = HEADS[model]
    w = _weights(h, which)
    x = _x(r, h, w.shape[1])
    poison()
    within_rounding(head_gemv(x, w), torch.einsum("rhk,hkn->rhn", x.float(), w.float()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r", [1, 16])
def test_head_gemv_other_dtypes(dtype, r):
    from moeray.kernels.head_gemv import head_gemv, head_gemv_ref

    w = _weights(16, "uv", dtype)
    x = _x(r, 16, 512, dtype)
    within_rounding(head_gemv(x, w), head_gemv_ref(x.float(), w.float()))


@pytest.mark.parametrize("which", ["uk", "uv"])
@pytest.mark.parametrize("r", ROWS)
def test_one_launch(which, r, monkeypatch):
    from moeray.kernels.head_gemv import head_matmul

    monkeypatch.setenv("MOERAY_FUSED_HEAD_GEMV", "1")
    w = _weights(16, which)
    x = _x(r, 16, w.shape[1]).view(r, 1, 16, w.shape[1])  # [B, S, H, K] as MLA passes it
    with torch.inference_mode():
        names = cuda_kernels(lambda: head_matmul(x, w))
    assert len(names) == 1 and "_head_gemv_kernel" in names[0], names


@pytest.mark.parametrize("which", ["uk", "uv"])
@pytest.mark.parametrize("model", ["moonlight", "v3"])
def test_head_bmm_leaves_no_copy(which, model, monkeypatch):
    """MOERAY_FUSED_HEAD_BMM=1 at 64 rows (past head_gemv): the product and the [rows, H * N]
    reshape that MLA's o_proj input takes launch one GEMM and no copy, where the einsum's
    permuted output makes the reshape copy; the values are the einsum's within bf16 rounding."""
    from moeray.kernels.head_gemv import head_matmul

    h = HEADS[model]
    w = _weights(h, which)
    x = _x(64, h, w.shape[1]).view(64, 1, h, w.shape[1])
    with torch.inference_mode():
        monkeypatch.setenv("MOERAY_FUSED_HEAD_BMM", "0")
        want = head_matmul(x, w)
        einsum = cuda_kernels(lambda: head_matmul(x, w).reshape(64, -1))
        monkeypatch.setenv("MOERAY_FUSED_HEAD_BMM", "1")
        got = head_matmul(x, w)
        bmm = cuda_kernels(lambda: head_matmul(x, w).reshape(64, -1))
    print(f"{model} {which}: einsum {einsum}, bmm {bmm}")

    def copies(names):
        return [n for n in names if "copy" in n or "elementwise" in n]

    assert got.is_contiguous() and not copies(bmm), bmm
    assert copies(einsum), einsum  # the reshape's copy: why HEAD_BMM exists
    within_rounding(got, want.float())


@pytest.mark.parametrize("which", ["uk", "uv"])
@pytest.mark.parametrize("r", [1, 16])
def test_head_gemv_cuda_graph(which, r):
    from moeray.kernels.head_gemv import head_gemv

    w = _weights(16, which)
    x = _x(r, 16, w.shape[1])
    eager = head_gemv(x, w)
    graph, y = captured(lambda: head_gemv(x, w))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    within_rounding(y, torch.einsum("rhk,hkn->rhn", x.float(), w.float()))
    assert not torch.equal(y, eager)  # the replay read the new x


def _tiny_greedy(dtype, monkeypatch, fused: bool) -> tuple[list, int]:
    from moeray.kernels import head_gemv as hg

    if fused:
        monkeypatch.setenv("MOERAY_FUSED_HEAD_GEMV", "1")
    else:
        monkeypatch.delenv("MOERAY_FUSED_HEAD_GEMV", raising=False)
    # MLA_WUK and MLA_WUV (the defaults) take W_UK and W_UV into the cache write and the merge at
    # up to 4 query rows, so decode rows reach head_matmul only with both off: without this the
    # fp32 engine (eager: its per-expert MoE cannot be captured) never called head_gemv.
    monkeypatch.setenv("MOERAY_FUSED_MLA_WUK", "0")
    monkeypatch.setenv("MOERAY_FUSED_MLA_WUV", "0")
    return tiny_greedy(dtype, monkeypatch, hg, "head_gemv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_greedy_unchanged_by_head_gemv(dtype, monkeypatch):
    fused, n_fused = _tiny_greedy(dtype, monkeypatch, fused=True)
    plain, n_plain = _tiny_greedy(dtype, monkeypatch, fused=False)
    assert n_fused > 0 and n_plain == 0, (n_fused, n_plain)  # decode rows (3) took head_gemv
    assert all(len(o) == 10 for o in fused)
    assert fused == plain


@pytest.mark.parametrize("which", ["uk", "uv"])
@pytest.mark.parametrize("model", sorted(HEADS))
@pytest.mark.parametrize("r", [17, 64])
def test_head_tile_mla_shapes(which, model, r, monkeypatch):
    """MOERAY_FUSED_HEAD_TILE=1: 17 and 64 rows in one launch of one row tile, within rounding of
    the fp32 einsum at both MLA widths and weight layouts."""
    from moeray.kernels.head_gemv import head_matmul

    monkeypatch.setenv("MOERAY_FUSED_HEAD_TILE", "1")
    h = HEADS[model]
    w = _weights(h, which)
    x = _x(r, h, w.shape[1])
    poison()
    with torch.inference_mode():
        names = cuda_kernels(lambda: head_matmul(x, w))
        y = head_matmul(x, w)
    assert len(names) == 1 and "_head_gemv_kernel" in names[0], names
    within_rounding(y, torch.einsum("rhk,hkn->rhn", x.float(), w.float()))
