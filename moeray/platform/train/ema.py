"""The exponential moving average of the parameters, kept in CPU memory and updated on a background
thread, as DeepSeek-V3 trained (report section 3.2.3: the EMA "is stored in CPU memory and is
updated asynchronously after each training step", so it costs no GPU memory or step time).

After every optimizer step, `update()` copies the parameters into pinned CPU buffers (a
non-blocking device-to-host copy under CUDA) and hands the fold to one worker thread:

    ema_t = decay * ema_{t-1} + (1 - decay) * param_t,    ema_0 = the parameters at construction

so after n updates ema_n = decay^n * param_0 + sum_i (1 - decay) * decay^(n-i) * param_i. The next
`update()`, `state_dict()` or `wait()` first waits for the previous fold, for at most `timeout_s`
(a TimeoutError naming it, never a hang). Buffers (the gates' routing biases) are not averaged:
an export takes the model's own.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch
from torch import nn

EMA_DIR = "ema"  # the EMA's HF directory inside the final model directory


class ParamEMA:
    def __init__(self, module: nn.Module, decay: float, *, timeout_s: float = 120.0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay={decay} must be in (0, 1)")
        if timeout_s <= 0:
            raise ValueError(f"ema timeout_s={timeout_s} must be > 0")
        self.decay, self.timeout_s = decay, timeout_s
        self._params = [(n, p) for n, p in module.named_parameters()]
        # pinned host memory lets the device-to-host copy run without blocking the host
        pin = any(p.is_cuda for _, p in self._params)
        self.ema = {
            n: torch.empty(p.shape, dtype=torch.float32, pin_memory=pin) for n, p in self._params
        }
        self._staged = {n: torch.empty_like(t, pin_memory=pin) for n, t in self.ema.items()}
        for n, p in self._params:
            self.ema[n].copy_(p.detach())
        self.updates = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeray-ema")
        self._pending: Future | None = None

    def update(self) -> None:
        """Fold the current parameters in, asynchronously (after each optimizer step)."""
        self.wait()  # the staging buffers are free again
        cuda = False
        for n, p in self._params:
            self._staged[n].copy_(p.detach(), non_blocking=p.is_cuda)
            cuda = cuda or p.is_cuda
        done = None
        if cuda:  # the thread waits for the copies, the training stream does not
            done = torch.cuda.Event()
            done.record()
        self._pending = self._pool.submit(self._fold, done)
        self.updates += 1

    def _fold(self, done) -> None:
        if done is not None:
            done.synchronize()
        for n, ema in self.ema.items():
            ema.mul_(self.decay).add_(self._staged[n], alpha=1.0 - self.decay)

    def wait(self) -> None:
        """Wait for the last `update()` to be folded in, at most `timeout_s`."""
        if self._pending is None:
            return
        try:
            self._pending.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise TimeoutError(
                f"the parameter EMA's background update did not finish in {self.timeout_s} s"
            ) from None
        self._pending = None

    def averaged_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """`module`'s state dict with the EMA in place of its parameters (CPU tensors)."""
        self.wait()
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        for n, ema in self.ema.items():
            state[n] = ema.to(state[n].dtype)
        return state

    def state_dict(self) -> dict:
        self.wait()
        return {
            "decay": self.decay,
            "updates": self.updates,
            "ema": {n: t.clone() for n, t in self.ema.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.wait()
        if set(state["ema"]) != set(self.ema):
            raise ValueError(
                f"EMA state names {sorted(set(state['ema']) ^ set(self.ema))[:5]} do not match "
                "this model's parameters"
            )
        for n, t in state["ema"].items():
            self.ema[n].copy_(t)
        self.updates = int(state["updates"])

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()
