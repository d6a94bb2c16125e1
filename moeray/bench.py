"""`moeray bench <name>`: dispatch to the benchmark that owns each name.

Every benchmark writes `benchmarks/results/<name>[-<device>].json` with device, date, command and
its numbers (see `moeray.results`).
"""

from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, str] = {
    "kernels": "moeray.kernels.bench",
    "engine": "moeray.platform.engine.bench",
    "serve": "moeray.platform.serve.bench",
    "kv": "moeray.platform.serve.kv_bench",
    "train": "moeray.platform.train.bench",
    "balance": "moeray.platform.balance_bench",
    "wide-ep": "moeray.platform.engine.ep_bench",
    "node-ep": "moeray.platform.parallel.node_bench",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        print("usage: moeray bench {" + ",".join(BENCHES) + "} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = argv[0]
    try:
        module = importlib.import_module(BENCHES[name])
    except ModuleNotFoundError as e:
        if e.name != BENCHES[name]:
            raise
        print(f"moeray bench {name}: not implemented yet", file=sys.stderr)
        return 2
    return int(module.main(argv[1:]) or 0)
