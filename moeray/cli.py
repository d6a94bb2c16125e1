"""`moeray` command line.

Each subcommand lives in its own module with a `main(argv) -> int`; the modules are imported only
when their subcommand runs, so `moeray --help` starts neither torch, CUDA nor Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "moeray.demo",
        "train a tiny model, serve it with prefill/decode split, send requests",
    ),
    "train": ("moeray.platform.train.job", "run the training job (Ray Train) from a YAML config"),
    "serve": ("moeray.platform.serve.cli", "serve a model directory with Ray Serve (OpenAI API)"),
    "bench": ("moeray.bench", "benchmarks: kernels | engine | serve | kv | train | balance"),
    "plan": ("moeray.platform.plan", "pipeline schedules and capacity planning"),
    "dashboards": ("moeray.platform.dashboards", "generate or push the Grafana dashboards"),
    "k8s": ("moeray.platform.k8s", "render the KubeRay manifests from the train and serve configs"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moeray",
        description="Train and serve DeepSeek-V3-style mixture-of-experts models on Ray.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)}")
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"moeray {name}: not implemented yet ({module_name} does not exist)", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
