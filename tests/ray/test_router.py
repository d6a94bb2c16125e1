"""RouterActor on a local Ray instance: summing ranks, retries, waiting, kill and restore."""

import time

import pytest
import torch

from moeray.platform.routing.balance import bias_update, maxvio
from moeray.platform.routing.state import RouterConfig

pytestmark = pytest.mark.ray


def _config():
    return RouterConfig(
        layer_ids=(1, 3),
        n_experts=8,
        n_group=4,
        topk_group=2,
        num_reporters=2,
        gamma=0.01,
        num_physical=12,
        serve_gpus=4,
        serve_nodes=2,
    )


def test_router_actor_sums_ranks_and_survives_a_kill(ray_local, tmp_path):
    ray = ray_local
    from moeray.actors.router import get_or_create_router

    cfg = _config()
    path = str(tmp_path / "router.pt")
    router = get_or_create_router("test-router", "moeray-test", cfg, path)
    try:
        g = torch.Generator().manual_seed(0)
        loads = [[torch.randint(0, 30, (2, 8), generator=g) for _ in range(2)] for _ in range(3)]
        # Same name: the same actor, not a second one.
        again = get_or_create_router("test-router", "moeray-test", cfg, path)
        assert ray.get(again.info.remote())["pid"] == ray.get(router.info.remote())["pid"]

        # A waiter for step 0 blocks until both ranks have reported.
        waiter = router.biases.remote(min_step=0, timeout_s=30)
        assert ray.get(router.report.remote(0, 0, loads[0][0]))["applied"] is False
        ready, _ = ray.wait([waiter], timeout=0.5)
        assert not ready
        assert ray.get(router.report.remote(0, 0, loads[0][0]))["counted"] is False  # retry
        assert ray.get(router.report.remote(0, 1, loads[0][1]))["applied"] is True
        got = ray.get(waiter)
        expect = bias_update(torch.zeros(2, 8), loads[0][0] + loads[0][1], 0.01)
        assert got["step"] == 0 and torch.allclose(got["bias_LE"], expect)
        assert ray.get(router.maxvio.remote()) == pytest.approx(
            dict(zip((1, 3), maxvio(loads[0][0] + loads[0][1]).tolist(), strict=True))
        )

        # Step 1 fully, step 2 half, then kill the actor: it restarts with all of it.
        ray.get(router.report.remote(1, 1, loads[1][1]))
        ray.get(router.report.remote(1, 0, loads[1][0]))
        ray.get(router.report.remote(2, 0, loads[2][0]))
        placement = ray.get(router.rebalance.remote())
        before = ray.get(router.state_dict.remote())
        old_pid = ray.get(router.info.remote())["pid"]
        ray.kill(router, no_restart=False)
        deadline = time.monotonic() + 60
        info = {"pid": old_pid}
        while info["pid"] == old_pid:  # ray.kill is asynchronous: wait for the new incarnation
            assert time.monotonic() < deadline, "router did not restart within 60 s"
            try:
                info = ray.get(router.info.remote(), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            time.sleep(0.1)
        assert info["pid"] != old_pid and info["restored"] is True
        assert info["step"] == 1 and info["pending_steps"] == [2]
        after = ray.get(router.state_dict.remote())
        assert torch.equal(after["bias_LE"], before["bias_LE"])
        assert torch.equal(
            after["placement"]["phy2log_LP"], torch.as_tensor(placement["phy2log_LP"])
        )

        # Rank 0's step-2 report survived the restart: a retry is not counted twice.
        assert ray.get(router.report.remote(2, 0, loads[2][0]))["counted"] is False
        assert ray.get(router.report.remote(2, 1, loads[2][1]))["applied"] is True
        bias = torch.zeros(2, 8)
        for s in range(3):
            bias = bias_update(bias, loads[s][0] + loads[s][1], 0.01)
        assert torch.allclose(ray.get(router.biases.remote())["bias_LE"], bias)

        # Waiting for a step nobody reports fails instead of hanging.
        with pytest.raises(ray.exceptions.RayTaskError, match="still waiting"):
            ray.get(router.biases.remote(min_step=9, timeout_s=0.3))
    finally:
        ray.kill(router, no_restart=True)
