"""A trained model's weights and optimizer state through ``save_trained``/``load_trained``:
a resumed run continues exactly as the run that never stopped, also where some parameters
never had a gradient before the checkpoint (Adam keeps no state for them: an expert no token
was routed to, a head that starts training later). Such a checkpoint used to fail to load
("Missing key in checkpoint state_dict")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from learner.checkpoint import CheckpointError, RankState, load_trained, save_trained


class Gated(nn.Module):
    """Two branches; ``late`` joins the forward pass only once ``use_late`` is set."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.early = nn.Linear(4, 4)
        self.late = nn.Linear(4, 4)
        self.use_late = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.early(x)
        return (y + self.late(x) if self.use_late else y).square().mean()


def trained(model: nn.Module) -> tuple:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return "policy", model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def steps(entry: tuple, inputs: list[torch.Tensor]) -> None:
    _, model, opt, sched = entry
    for x in inputs:
        opt.zero_grad()
        model(x).backward()
        opt.step()
        sched.step()


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def resume(path: str, groups, schedulers, unstepped) -> tuple:
    entry = trained(Gated())
    state = RankState(param_groups=groups, schedulers=schedulers, rng="", unstepped=unstepped)
    load_trained(path, [entry], state, {"policy": (1e-2, 1e-2)}, weight_decay=0.01)
    return entry


def test_parameters_without_a_gradient_resume_as_if_never_stepped(tmp_path):
    gen = torch.Generator().manual_seed(1)
    before, after = ([torch.randn(8, 4, generator=gen) for _ in range(n)] for n in (3, 3))

    straight = trained(Gated())
    steps(straight, before)
    assert len(straight[2].state) == 2  # early's weight and bias only: late never had a gradient
    groups, schedulers, unstepped = save_trained(str(tmp_path), [straight])
    straight[1].use_late = True
    steps(straight, after)

    resumed = resume(str(tmp_path), groups, schedulers, unstepped)
    _, model, opt, _ = resumed
    assert all(float(s["step"]) == 3 for p, s in opt.state.items() if any(p is q for q in model.early.parameters()))
    model.use_late = True
    steps(resumed, after)
    # late's first update is Adam's first (fresh moments, step 1) in both runs, and the rest follows.
    for a, b in zip(weights(model), weights(straight[1]), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_model_is_named(tmp_path):
    entry = trained(nn.Linear(4, 4))
    steps((entry[0], lambda x: entry[1](x).sum(), entry[2], entry[3]), [torch.ones(2, 4)])
    groups, schedulers, unstepped = save_trained(str(tmp_path), [entry])
    with pytest.raises(CheckpointError, match=r"has no policy/early\.weight.*another model"):
        resume(str(tmp_path), groups, schedulers, unstepped)
