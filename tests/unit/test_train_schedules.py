"""The paper's schedules from the job config (`schedule.gamma`, `schedule.mtp_lambda`): the values
per step, the RouterState applying the gamma it was configured with (biases frozen once gamma is
0), the step's loss using the scheduled lambda, and clear errors for bad schedules. The Ray job
records both per step (tests/ray/test_train_job.py)."""

import pytest
import torch

from moeray.platform.config import tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.routing.balance import GammaSchedule
from moeray.platform.routing.state import RouterConfig, RouterState
from moeray.platform.train import step as ts
from moeray.platform.train.job_config import TrainJobConfig
from moeray.platform.train.schedules import first_step

# DeepSeek-V3: gamma 0.001 for 14.3T of 14.8T tokens, then 0; lambda 0.3 for 10T, then 0.1
PAPER = {"gamma": [[14.3 / 14.8, 0.0]], "mtp_lambda": [[10 / 14.8, 0.1]]}


def test_paper_schedules_per_step():
    job = TrainJobConfig.from_dict({"steps": 148, "gamma": 0.001, "schedule": PAPER})
    # 148 steps of 0.1T tokens each: step 143 starts at 14.3T, step 100 at 10T
    gammas = [job.gamma_at(s) for s in range(148)]
    assert gammas == [0.001] * 143 + [0.0] * 5
    lams = [job.loss_at(s).mtp_lambda for s in range(148)]
    assert lams == [0.3] * 100 + [0.1] * 48
    assert job.loss_at(120).balance_alpha == job.loss.balance_alpha  # only lambda changes
    assert job.gamma_changes() == ((143, 0.0),)
    assert TrainJobConfig.from_dict(job.to_dict()) == job  # what the workers receive
    # no schedule: the constants throughout
    plain = TrainJobConfig.from_dict({"steps": 10})
    assert {plain.gamma_at(s) for s in range(10)} == {0.001}
    assert {plain.loss_at(s).mtp_lambda for s in range(10)} == {0.3}


def test_several_breakpoints_and_fraction_rounding():
    job = TrainJobConfig.from_dict(
        {"steps": 10, "schedule": {"mtp_lambda": [[0.3, 0.2], [0.7, 0.05], [1.0, 0.0]]}}
    )
    # 0.3 * 10 is 3.0000000000000004 in floats; step 3 has seen 30% of the tokens
    assert first_step(0.3, 10) == 3 and first_step(0.31, 10) == 4
    assert [job.loss_at(s).mtp_lambda for s in range(10)] == [0.3] * 3 + [0.2] * 4 + [0.05] * 3


@pytest.mark.parametrize(
    "schedule, match",
    [
        ({"gamma": [[0.5, 0.0], [0.4, 0.1]]}, "fraction 0.4 must be in \\(0, 1\\] and greater"),
        ({"gamma": [[0.0, 0.1]]}, "fraction 0.0 must be in"),
        ({"mtp_lambda": [[1.5, 0.1]]}, "fraction 1.5"),
        ({"mtp_lambda": [[0.5, -0.1]]}, "value -0.1 at fraction 0.5 must be finite and >= 0"),
        ({"gamma": [0.5, 0.0]}, "schedule.gamma=\\[0.5, 0.0\\] must be a list of \\[fraction"),
        ({"gamma": [["half", 0.0]]}, "must be a list of \\[fraction, value\\] pairs"),
        ({"beta": [[0.5, 0.0]]}, "unknown keys \\['beta'\\] in 'schedule'"),
    ],
)
def test_bad_schedules_are_refused(schedule, match):
    with pytest.raises(ValueError, match=match):
        TrainJobConfig.from_dict({"schedule": schedule})


def test_gamma_schedule_with_changes():
    s = GammaSchedule(0.001, changes=((5, 0.0005), (8, 0.0)))
    assert [s(i) for i in (0, 4, 5, 7, 8, 100)] == [0.001, 0.001, 0.0005, 0.0005, 0.0, 0.0]
    with pytest.raises(ValueError, match="increasing steps"):
        GammaSchedule(0.001, changes=((8, 0.0), (5, 0.1)))
    with pytest.raises(ValueError, match="gamma >= 0"):
        GammaSchedule(0.001, changes=((5, -0.1),))


def test_router_applies_the_jobs_gamma_and_keeps_it_over_a_restore():
    job = TrainJobConfig.from_dict({"steps": 8, "schedule": {"gamma": [[0.75, 0.0]]}})
    cfg = RouterConfig.from_model(
        tiny(), num_reporters=1, gamma=job.gamma, gamma_changes=job.gamma_changes()
    )
    router = RouterState(cfg)
    g = torch.Generator().manual_seed(0)
    L, E = len(cfg.layer_ids), cfg.n_experts
    seen = []
    for step in range(8):
        if step == 4:  # a restart: a fresh router restored from the saved state
            saved = router.state_dict()
            router = RouterState(RouterConfig.from_model(tiny(), num_reporters=1))
            router.load_state_dict(saved)
        before = router.biases()["bias_LE"]
        router.report(step, 0, torch.randint(0, 100, (L, E), generator=g))
        after = router.biases()
        seen.append(after["applied_gamma"])
        moved = (after["bias_LE"] - before).abs().max().item()
        # a sign step moves some bias by exactly gamma while gamma > 0, none once it is 0
        assert moved == pytest.approx(job.gamma_at(step), abs=1e-9), step
    assert seen == [0.001] * 6 + [0.0] * 2


def test_the_steps_loss_uses_the_scheduled_lambda():
    job = TrainJobConfig.from_dict({"steps": 4, "schedule": {"mtp_lambda": [[0.5, 0.1]]}})
    model = Transformer(tiny())
    model.reset_parameters(seed=0)
    tokens = torch.randint(
        0, tiny().vocab_size, (2, 17), generator=torch.Generator().manual_seed(1)
    )
    early, late = (
        ts.compute_loss(model, tokens, job.loss_at(0)),
        ts.compute_loss(model, tokens, job.loss_at(3)),
    )
    assert early.main == late.main and early.mtp == late.mtp
    for parts, lam in ((early, 0.3), (late, 0.1)):
        assert parts.total.item() == pytest.approx(
            parts.main + lam * parts.mtp + parts.balance, rel=1e-5
        )
