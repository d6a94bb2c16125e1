"""scripts/pdl_probe.py's persistent chain on the CPU (Triton's interpreter, one program): every
layer's output equals the bf16-rounded product of the one before, at widths off the tile grid and
with both weight orders (PREFETCH off and on), and the kernel leaves its counters zero, so the
next launch (the next graph replay) starts clean. The GPU runs many programs that wait on each
other: what the interpreter cannot show, the probe's error column does."""

import json

import pytest
import torch


def _reference(x0: torch.Tensor, w_LNN: torch.Tensor) -> torch.Tensor:
    xs = [x0]
    for w in w_LNN:
        xs.append((w.float() @ xs[-1].float()).to(x0.dtype))
    return torch.stack(xs)


@pytest.mark.parametrize("prefetch, spin", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("n, block_n", [(40, 16), (33, 8), (64, 64)])
def test_persistent_chain_matches_the_layer_by_layer_product(
    load_script, n, block_n, prefetch, spin
):
    mod = load_script("pdl_probe")
    g = torch.Generator().manual_seed(n)
    L = 3
    w_LNN = (torch.randn(L, n, n, generator=g) * n**-0.5).to(torch.bfloat16)
    x_LN = torch.zeros(L + 1, n, dtype=torch.bfloat16)
    x_LN[0] = torch.randn(n, generator=g).to(torch.bfloat16)
    done = torch.zeros(L + 2, dtype=torch.int32)
    want = _reference(x_LN[0], w_LNN)
    for _ in range(2):  # the second launch finds the counters the first one left
        x_LN[1:] = 0
        mod.persistent_chain(x_LN, w_LNN, done, block_n, 4, prefetch, spin)
        torch.testing.assert_close(x_LN.float(), want.float(), rtol=1e-2, atol=1e-2)
        assert done.tolist() == [0] * (L + 2)


def test_persistent_chain_rejects_bad_shapes_and_program_counts(load_script):
    mod = load_script("pdl_probe")
    w = torch.zeros(2, 8, 8, dtype=torch.bfloat16)
    x = torch.zeros(3, 8, dtype=torch.bfloat16)
    done = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"x \(2, 8\).*L=2, N=8"):
        mod.persistent_chain(x[:2], w, done, 4, 4, False)
    with pytest.raises(ValueError, match=r"programs=3: must be 1\.\.2"):
        mod.persistent_chain(x, w, done, 4, 4, False, programs=3)


def test_persistent_chain_gives_up_a_wait_instead_of_hanging(load_script, monkeypatch):
    """Two programs under the interpreter run one after the other, so program 0 waits for tiles
    that program 1 has not stored yet: the wait gives up after MAX_POLLS and is counted."""
    mod = load_script("pdl_probe")
    monkeypatch.setattr(mod, "MAX_POLLS", 3)
    L, n = 2, 32
    w = torch.ones(L, n, n, dtype=torch.bfloat16)
    x = torch.ones(L + 1, n, dtype=torch.bfloat16)
    done = torch.zeros(L + 2, dtype=torch.int32)
    mod.persistent_chain(x, w, done, 16, 4, False, programs=2)
    assert done[:-1].tolist() == [0] * (L + 1)
    assert done[-1] >= 1


def test_probe_main_runs_every_variant_and_writes_its_table(load_script, monkeypatch, tmp_path):
    """main() end to end on the CPU (the plain chain under the interpreter too, the graph timer
    replaced by one run): every row present, the persistent rows equal to the plain chain, the
    result file written; so a GPU call does not find a broken probe. The pdl rows fail here (the
    interpreter has no griddepcontrol) and are recorded as errors, as a GPU failure would be."""
    mod = load_script("pdl_probe")
    monkeypatch.setattr(mod, "DEVICE", "cpu")
    monkeypatch.setattr(mod, "PERSISTENT_TILES", ((16, 4, False, False), (8, 4, True, True)))
    monkeypatch.setattr(mod, "device_slug", lambda: "cpu")
    times = iter(range(1, 100))

    def timed(run, replays):
        run()
        return float(next(times))  # ms

    monkeypatch.setattr(mod, "_timed", timed)
    assert mod.main(["--n", "32", "--layers", "3", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "pdl-probe-cpu-n32.json").read_text())["rows"]
    assert list(rows) == ["plain", "pdl", "prefetch", "persistent_b16_w4", "persistent_b8_w4_pf_ld"]
    for name in ("plain", "persistent_b16_w4", "persistent_b8_w4_pf_ld"):
        r = rows[name]
        assert r["max_rel_err_vs_plain"] < 1e-2, (name, r)
        assert r["counters_zero"] and r["waits_given_up"] == 0, (name, r)
