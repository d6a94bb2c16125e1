"""`moeray bench balance`: expert load balance of the tiny model under three balancing methods.

Legend: B sequences per batch, S sequence length, L MoE layers (main + MTP), E routed experts.

Three runs, same seed, data order, steps and optimizer; only the balancing differs:
  bias      aux-loss-free bias updates (RouterState, sign rule with gamma, over the global batch)
            plus the complementary sequence-wise balance loss with alpha = 1e-4 (the V3 recipe);
  none      no balancing at all;
  aux_loss  no bias; the conventional sequence-wise expert-balance auxiliary loss with a weight
            large enough to balance on its own (alpha = 0.01 by default, DeepSeekMoE 2B's value).
Per step it records MaxVio (max load / mean load - 1) of the step's batch, averaged over the MoE
layers, and checks the node limit; at the end, the next-token loss on held-out windows.

A single process here; the Ray Train job reuses the same pieces (`routing.state.RouterState`
behind the RouterActor, `routing.balance.sequence_balance_loss`, `MoE.last_routing`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moeray.kernels.gate import Routing
from moeray.platform.config import tiny
from moeray.platform.model.moe import MoE
from moeray.platform.model.transformer import Transformer
from moeray.platform.routing.balance import balance_stats, maxvio, sequence_balance_loss
from moeray.platform.routing.state import RouterConfig, RouterState
from moeray.platform.train import data
from moeray.results import RESULTS_DIR, write_result

RUN_NAMES = ("bias", "none", "aux_loss")
# V3's MTP loss weight for the first 10T tokens (docs/deepseek-v3.md, "Multi-token prediction"):
# every run trains the MTP module, whose MoE block is balanced like the others.
MTP_LAMBDA = 0.3


@dataclass(frozen=True)
class BenchConfig:
    steps: int = 400
    batch: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    seed: int = 0
    # gamma=0.001 moves a bias by at most 0.4 in 400 steps, comparable to the spread of sigmoid
    # affinities of a freshly initialised gate (~0.1-0.3), so the short run can still balance.
    gamma: float = 0.001
    seq_alpha: float = 1e-4
    aux_alpha: float = 0.01
    max_bytes: int = 4_000_000
    eval_batches: int = 8

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq_len", "eval_batches", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("lr", "gamma", "seq_alpha", "aux_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")


def _prepare_data(cfg: BenchConfig, vocab_size: int, workdir: Path):
    """Tokenizer + packed windows of the default corpus; the last 5% of the stream is held out."""
    _, tokens_path = data.prepare_corpus(
        workdir, None, vocab_size=vocab_size, max_bytes=cfg.max_bytes
    )
    tokens = torch.load(tokens_path)
    n_eval = max((cfg.seq_len + 1) * cfg.batch * cfg.eval_batches, tokens.numel() // 20)
    if tokens.numel() <= n_eval + (cfg.seq_len + 1) * cfg.batch:
        raise ValueError(
            f"corpus of {tokens.numel()} tokens is too small; raise max_bytes={cfg.max_bytes}"
        )
    train = data.PackedDataset(tokens[:-n_eval], cfg.seq_len)
    held_out = data.PackedDataset(tokens[-n_eval:], cfg.seq_len).windows_NS1
    return train, held_out[: cfg.batch * cfg.eval_batches].view(cfg.eval_batches, cfg.batch, -1)


def _lm_loss(logits_BSV, targets_BS):
    return F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())


def _last_routing(moe: MoE) -> Routing:
    if moe.last_routing is None:
        raise RuntimeError("a MoE layer has no routing: the forward did not run through it")
    return moe.last_routing


def train_run(name: str, cfg: BenchConfig, train_set, eval_BNS) -> dict:
    """One training run; returns per-step MaxVio and losses and the held-out loss."""
    if name not in RUN_NAMES:
        raise ValueError(f"run {name!r}; accepted: {RUN_NAMES}")
    use_bias = name == "bias"
    alpha = {"bias": cfg.seq_alpha, "none": 0.0, "aux_loss": cfg.aux_alpha}[name]

    model_cfg = tiny()
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    model.reset_parameters(cfg.seed)
    moes = model.moe_layers()
    router = RouterState(RouterConfig.from_model(model_cfg, gamma=cfg.gamma))
    assert len(moes) == len(router.config.layer_ids), (len(moes), router.config.layer_ids)
    group_to_node = router.config.nodes
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    loader = data.BatchLoader(train_set, cfg.batch, seed=cfg.seed)
    warmup = max(1, cfg.steps // 20)

    maxvio_steps, maxvio_layers, losses, nodes_max = [], [], [], 0
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        batch_BS1 = loader.next_batch()
        inputs, targets = batch_BS1[:, :-1], batch_BS1[:, 1:]
        out = model(inputs)
        lm = _lm_loss(out.logits, targets)
        loss = lm
        for k, mtp_logits in enumerate(out.mtp_logits, start=1):
            loss = loss + MTP_LAMBDA / len(out.mtp_logits) * _lm_loss(mtp_logits, targets[:, k:])
        routings = [_last_routing(m) for m in moes]
        loads_LE = torch.stack([r.counts_E for r in routings])
        if alpha > 0:
            for r in routings:
                B = inputs.shape[0]
                loss = loss + sequence_balance_loss(
                    r.scores_TE.view(B, -1, r.scores_TE.shape[-1]),
                    r.expert_ids_TK.view(B, -1, r.expert_ids_TK.shape[-1]),
                    alpha,
                )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        vio_L = maxvio(loads_LE)
        maxvio_steps.append(round(float(vio_L.mean()), 5))
        maxvio_layers.append([round(float(v), 5) for v in vio_L])
        losses.append(round(float(lm.detach()), 5))
        for r in routings:
            stats = balance_stats(r.expert_ids_TK, model_cfg.n_routed_experts, group_to_node)
            nodes_max = max(nodes_max, stats.nodes_per_token_max)
        if use_bias:
            # Exactly what a training worker does with the RouterActor, in-process: report this
            # (only) rank's loads, read back the biases, copy them into the layers' buffers.
            router.report(step, 0, loads_LE)
            bias_LE = router.biases()["bias_LE"]
            with torch.no_grad():
                for m, b in zip(moes, bias_LE, strict=True):
                    m.gate.e_score_correction_bias.copy_(b)
    seconds = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        held_out = [
            float(_lm_loss(model(b[:, :-1], return_mtp=False).logits, b[:, 1:])) for b in eval_BNS
        ]
    q = max(1, cfg.steps // 4)
    return {
        "maxvio": maxvio_steps,
        "final_loss": round(sum(held_out) / len(held_out), 5),
        "final_train_loss": round(sum(losses[-q:]) / q, 5),
        "maxvio_last_quarter": round(sum(maxvio_steps[-q:]) / q, 5),
        "maxvio_per_layer_last_quarter": [
            round(sum(v[i] for v in maxvio_layers[-q:]) / q, 5) for i in range(len(moes))
        ],
        "train_loss": losses,
        "nodes_per_token_max": nodes_max,
        "bias_abs_max": round(float(router.bias_LE.abs().max()), 5),
        "seconds": round(seconds, 1),
    }


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_v, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"bias": "tab:green", "none": "tab:red", "aux_loss": "tab:blue"}
    for name, run in runs.items():
        v, loss = run["maxvio"], run["train_loss"]
        ax_v.plot(v, color=colors.get(name), alpha=0.2, lw=0.8)
        ax_v.plot(
            _moving_average(v, max(1, len(v) // 40)),
            color=colors.get(name),
            label=f"{name} (last quarter {run['maxvio_last_quarter']:.2f})",
        )
        # The three loss curves overlap within noise; a moving average over the second half
        # shows the differences that matter.
        start = len(loss) // 2
        smooth = _moving_average(loss, max(1, len(loss) // 16))
        ax_l.plot(
            range(start, len(loss)),
            smooth[start:],
            color=colors.get(name),
            label=f"{name} (held-out {run['final_loss']:.3f})",
        )
    ax_v.set(xlabel="step", ylabel="MaxVio (mean over MoE layers)", title="Expert load imbalance")
    ax_l.set(
        xlabel="step", ylabel="train next-token loss (moving average)", title="Loss, second half"
    )
    ax_v.legend()
    ax_l.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(
    cfg: BenchConfig, out_dir: Path | None = None, *, make_plot: bool = True, log=print
) -> dict:
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    with tempfile.TemporaryDirectory() as tmp:
        train_set, eval_BNS = _prepare_data(cfg, tiny().vocab_size, Path(tmp))
    runs = {}
    for name in RUN_NAMES:
        runs[name] = train_run(name, cfg, train_set, eval_BNS)
        r = runs[name]
        log(
            f"{name:9s} MaxVio last quarter {r['maxvio_last_quarter']:.3f}  held-out loss "
            f"{r['final_loss']:.4f}  nodes/token max {r['nodes_per_token_max']}  {r['seconds']} s"
        )
    bias, none, aux = runs["bias"], runs["none"], runs["aux_loss"]
    checks = {
        # "far below": at most half of the unbalanced run's MaxVio.
        "bias_maxvio_below_half_of_none": bias["maxvio_last_quarter"]
        < 0.5 * none["maxvio_last_quarter"],
        "bias_loss_not_worse_than_aux_loss": bias["final_loss"] <= aux["final_loss"],
        "node_limit_held": all(
            r["nodes_per_token_max"] <= tiny().topk_group for r in runs.values()
        ),
    }
    numbers = {
        "config": {
            **cfg.__dict__,
            "model": "tiny",
            "corpus": "stdlib .py (moeray.platform.train.data)",
            "torch_threads": torch.get_num_threads(),
        },
        "summary": {
            name: {"maxvio_last_quarter": r["maxvio_last_quarter"], "final_loss": r["final_loss"]}
            for name, r in runs.items()
        },
        "checks": checks,
        "runs": runs,
    }
    path = write_result("balance", numbers, directory=out_dir)
    log(f"wrote {path}")
    if make_plot:
        plot(runs, out_dir / "balance.png")
        log(f"wrote {out_dir / 'balance.png'}")
    for k, ok in checks.items():
        log(f"{'ok  ' if ok else 'FAIL'} {k}")
    return numbers


def main(argv: list[str]) -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="moeray bench balance", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--gamma", type=float, default=d.gamma)
    p.add_argument(
        "--seq-alpha", type=float, default=d.seq_alpha, help="complementary loss weight (bias run)"
    )
    p.add_argument(
        "--aux-alpha", type=float, default=d.aux_alpha, help="conventional aux loss weight"
    )
    p.add_argument("--max-bytes", type=int, default=d.max_bytes, help="corpus size in bytes")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches)
    p.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        cfg = BenchConfig(
            a.steps,
            a.batch,
            a.seq_len,
            a.lr,
            a.seed,
            a.gamma,
            a.seq_alpha,
            a.aux_alpha,
            a.max_bytes,
            a.eval_batches,
        )
    except ValueError as e:
        print(f"moeray bench balance: {e}", file=sys.stderr)
        return 2
    numbers = run_bench(cfg, a.out_dir, make_plot=not a.no_plot)
    print(json.dumps(numbers["summary"]))
    return 0 if all(numbers["checks"].values()) else 1
