"""The parameter EMA in CPU memory (`ema_decay`, train/ema.py): after n real training steps it
equals the closed form over the recorded parameters; the fold runs on a background thread and every
wait for it is bounded; its state survives a checkpoint; bad decays are refused. The Ray job writes
it as the final model's ema/ HF directory (tests/ray/test_train_job.py)."""

import threading
import time

import pytest
import torch

from moeray.platform.config import tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.train import step as ts
from moeray.platform.train.ema import ParamEMA
from moeray.platform.train.job_config import TrainJobConfig


def test_ema_after_n_steps_is_the_closed_form():
    torch.manual_seed(0)
    model = Transformer(tiny())
    model.reset_parameters(seed=1)
    optim_cfg = ts.OptimConfig(lr=1e-2, warmup_steps=0, total_steps=6)
    optimizer = ts.build_optimizer(model, optim_cfg)
    decay, n = 0.7, 6
    ema = ParamEMA(model, decay)
    recorded = [{k: p.detach().clone() for k, p in model.named_parameters()}]
    g = torch.Generator().manual_seed(2)
    for step in range(n):
        tokens = torch.randint(0, 1024, (2, 17), generator=g)
        ts.train_step(model, optimizer, tokens, step, optim_cfg, ts.LossConfig())
        ema.update()
        recorded.append({k: p.detach().clone() for k, p in model.named_parameters()})
    state = ema.state_dict()
    assert state["updates"] == n
    for k in recorded[0]:
        closed = decay**n * recorded[0][k] + sum(
            (1 - decay) * decay ** (n - i) * recorded[i][k] for i in range(1, n + 1)
        )
        torch.testing.assert_close(state["ema"][k], closed, rtol=1e-5, atol=1e-7, msg=k)
    moved = [k for k in recorded[0] if not torch.equal(recorded[0][k], recorded[-1][k])]
    assert len(moved) > 20 and not any(torch.equal(state["ema"][k], recorded[-1][k]) for k in moved)
    # the export: the model's state dict with the EMA for its parameters, its own buffers
    averaged = ema.averaged_state(model)
    assert averaged.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        if k not in recorded[0]:  # buffers (routing biases) are the model's
            assert torch.equal(averaged[k], v), k
    ema.close()


class _SlowFold(ParamEMA):
    """An EMA whose fold takes `delay` seconds (a slow host) and records its thread."""

    delay = 0.5

    def _fold(self, done) -> None:
        self.fold_thread = threading.current_thread()
        time.sleep(self.delay)
        super()._fold(done)


def test_update_returns_before_the_fold_and_waits_are_bounded():
    model = torch.nn.Linear(4, 3)
    ema = _SlowFold(model, 0.5, timeout_s=5.0)
    t0 = time.perf_counter()
    ema.update()
    assert time.perf_counter() - t0 < 0.25  # the step goes on while the thread folds
    ema.wait()
    assert ema.fold_thread is not threading.main_thread()
    torch.testing.assert_close(ema.ema["weight"], model.weight.detach())  # (p + p) / 2
    hung = _SlowFold(model, 0.5, timeout_s=0.1)
    hung.delay = 2.0
    hung.update()
    with pytest.raises(TimeoutError, match=r"did not finish in 0\.1 s"):
        hung.update()  # the next update waits for the previous fold, at most timeout_s
    hung.delay = 0.0
    time.sleep(2.0)
    hung.close()
    ema.close()


def test_ema_state_round_trip_and_bad_values():
    model = torch.nn.Linear(4, 3)
    ema = ParamEMA(model, 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    saved = ema.state_dict()
    again = ParamEMA(model, 0.9)
    again.load_state_dict(saved)
    assert again.updates == 1 and torch.equal(again.ema["weight"], ema.ema["weight"])
    with pytest.raises(ValueError, match="do not match"):
        ParamEMA(torch.nn.Linear(4, 3, bias=False), 0.9).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"decay=1\.0 must be in \(0, 1\)"):
        ParamEMA(model, 1.0)
    with pytest.raises(ValueError, match=r"ema_decay=1\.5 must be in \[0, 1\)"):
        TrainJobConfig.from_dict({"ema_decay": 1.5})
    with pytest.raises(ValueError, match=r"need parallel\.pp=1"):
        TrainJobConfig.from_dict({"ema_decay": 0.9, "parallel": {"pp": 2, "microbatches": 4}})
    assert TrainJobConfig.from_dict({}).ema_decay == 0.0  # off by default
    ema.close()
    again.close()
