"""`moeray bench engine --ab`: the switch names it takes, the value that flips each, and that each
A/B engine is built and timed with its one switch flipped and the others as run."""

import os

import pytest

from moeray.platform.engine.bench.ab import (
    AGAIN,
    OPT_IN,
    SWITCHES,
    ab_table,
    flipped,
    parse_ab,
    run_ab,
    switch_env,
)


def test_parse_ab_takes_names_with_or_without_the_prefix_once_each():
    assert parse_ab("argmax, MOERAY_FUSED_HEAD_TILE,,ARGMAX") == [
        "ARGMAX",
        "HEAD_TILE",
    ]
    assert parse_ab("") == []
    with pytest.raises(ValueError, match=r"'ARGMAXX': not a switch; accepted: GATE, NORM"):
        parse_ab("ARGMAXX")
    # an arm of several switches flipped together, each once, named in the order given
    assert parse_ab("moe_h128 + ALIGN_QUANT+MOE_H128, MOE_H128,MOE_H128+ALIGN_QUANT") == [
        "MOE_H128+ALIGN_QUANT",
        "MOE_H128",
    ]
    with pytest.raises(ValueError, match=r"'SHARED_SUMM': not a switch"):
        parse_ab("MOE_H128+SHARED_SUMM")


def test_flipped_turns_each_switch_the_other_way_from_the_run():
    assert set(OPT_IN) < set(SWITCHES)
    assert flipped("ARGMAX", {}) == "1"  # opt-in: off unless "1"
    assert flipped("ARGMAX", {"MOERAY_FUSED_ARGMAX": "1"}) == "0"
    assert flipped("ARGMAX", {"MOERAY_FUSED_ARGMAX": "yes"}) == "1"  # not "1": off
    assert flipped("NORM", {}) == "0"  # default on: on unless "0"
    assert flipped("NORM", {"MOERAY_FUSED_NORM": "0"}) == "1"
    env = switch_env({"MOERAY_FUSED_PDL": "0"})
    assert env["MOERAY_FUSED_PDL"] == "0" and env["MOERAY_FUSED_GEMV"] == "1"
    assert env["MOERAY_FUSED_HEAD_TILE"] == "0" and len(env) == len(SWITCHES)


def test_run_ab_builds_and_times_each_engine_under_its_one_flip(monkeypatch):
    monkeypatch.delenv("MOERAY_FUSED_ARGMAX", raising=False)
    monkeypatch.setenv("MOERAY_FUSED_PDL", "0")  # as this run was started
    seen = []

    def make_engine():
        return {"built": switch_env()}

    def decode(engine, prompts):
        now = switch_env()
        assert now == engine["built"]  # decoded under the env it was built with
        seen.append(now)
        argmax = now["MOERAY_FUSED_ARGMAX"] == "1"
        return (200.0 if argmax else 100.0) * len(prompts), [[7, 8] if argmax else [7, 9]] * len(
            prompts
        )

    rows = run_ab(
        ["ARGMAX", "PDL", "ARGMAX+PDL"],
        make_engine,
        decode,
        lambda engine, B: 2.0 * B,
        {1: [[1, 2]], 2: [[1], [2]]},
        {"1": 100.0, "2": 200.0},
        {"1": 4.0, "2": 8.0},
        {"1": [[7, 9]], "2": [[7, 9], [7, 9]]},
        {"1": 400.0, "2": 1600.0},
    )
    assert list(rows) == ["ARGMAX", "PDL", "ARGMAX+PDL", AGAIN]
    one, pdl, again = rows["ARGMAX"], rows["PDL"], rows[AGAIN]
    assert one["env"] == {"MOERAY_FUSED_ARGMAX": "1"}
    assert pdl["env"] == {"MOERAY_FUSED_PDL": "1"} and again["env"] == {}
    assert rows["ARGMAX+PDL"]["env"] == {
        "MOERAY_FUSED_ARGMAX": "1",
        "MOERAY_FUSED_PDL": "1",
    }
    # each engine saw its arm's flips and the rest as run
    assert [s["MOERAY_FUSED_ARGMAX"] for s in seen] == ["1", "1", "0", "0", "1", "1", "0", "0"]
    assert [s["MOERAY_FUSED_PDL"] for s in seen] == ["0", "0", "1", "1", "1", "1", "0", "0"]
    assert os.environ["MOERAY_FUSED_PDL"] == "0" and "MOERAY_FUSED_ARGMAX" not in os.environ
    assert one["tokens_per_s_vs_main"] == {"1": 2.0, "2": 2.0}
    assert one["decode_graph_ms"] == {"1": 2.0, "2": 4.0}
    assert one["graph_ms_vs_main"] == {"1": 0.5, "2": 0.5}
    assert one["tokens_equal_to_main"] == {"1": 0.5, "2": 0.5}
    assert one["roofline_fraction"] == {"1": 0.5, "2": 0.25}  # 200 / 400, 400 / 1,600
    assert again["tokens_equal_to_main"] == {"1": 1.0, "2": 1.0}
    lines = ab_table(rows)
    assert len(lines) == 1 + 4 * 2 and lines[1].split()[:2] == ["ARGMAX", "1"]
    assert lines[1].split()[-1] == "50.0%" and lines[2].split()[-1] == "25.0%"


def test_run_ab_keeps_going_past_a_row_that_fails():
    def make_engine():
        if os.environ.get("MOERAY_FUSED_HEAD_TILE") == "1":
            raise RuntimeError("graph capture failed")
        return {}

    rows = run_ab(
        ["HEAD_TILE", "ARGMAX"],
        make_engine,
        lambda engine, prompts: (10.0, [[1]]),
        lambda engine, B: None,
        {1: [[1]]},
        {"1": 10.0},
        {},
        {"1": [[1]]},
    )
    assert rows["HEAD_TILE"]["error"] == "RuntimeError: graph capture failed"
    assert rows["ARGMAX"]["tokens_per_s_vs_main"] == {"1": 1.0}
    assert rows[AGAIN]["decode_graph_ms"] == {}
    assert any("HEAD_TILE" in line and "failed" in line for line in ab_table(rows))
