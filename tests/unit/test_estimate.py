"""``estimate_advantages``: the composition of KL penalty, estimator and whitening, against a
per-row loop written from the papers' definitions, on ragged rows."""

from __future__ import annotations

import pytest
import torch

from cluster.config import ConfigError, load_config
from learner.config import AlgorithmConfig
from learner.estimate import estimate_advantages

ESTIMATORS = ["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
GAMMA, LAM = 0.9, 0.8


def batch(seed: int = 3, rows: int = 12, width: int = 8, group: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).double()
    old = -torch.rand(rows, width, generator=g, dtype=torch.float64) * mask
    ref = (old + 0.2 * torch.randn(rows, width, generator=g, dtype=torch.float64)) * mask
    values = torch.randn(rows, width, generator=g, dtype=torch.float64) * mask
    scores = torch.randint(0, 2, (rows,), generator=g).double()
    scores[:group] = 1.0  # one group with no signal: every sample right
    return dict(scores=scores, group_index=torch.arange(rows) // group, mask=mask, old_logprobs=old,
                ref_logprobs=ref, values=values, lengths=lengths.tolist())


def whiten(a: torch.Tensor, mask: torch.Tensor, centre: bool) -> torch.Tensor:
    real = a[mask.bool()]
    shifted = a - real.mean() if centre else a
    return torch.where(mask.bool(), shifted / (real.var(unbiased=False) + 1e-8).sqrt(), 0)


def naive(estimator: str, b: dict, kl_coef: float, whiten_adv: bool) -> torch.Tensor:
    """Row by row, token by token: k1 KL (log pi_old - log ref) as a per-token reward penalty."""
    mask, lengths = b["mask"], b["lengths"]
    rows, width = mask.shape
    kl = [[float(b["old_logprobs"][i, t] - b["ref_logprobs"][i, t]) for t in range(lengths[i])] for i in range(rows)]
    scores = b["scores"].tolist()
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(b["group_index"].tolist()):
        groups.setdefault(k, []).append(i)
    out = torch.zeros(rows, width, dtype=torch.float64)
    if estimator in ("gae", "reinforce_pp", "reinforce_pp_baseline"):
        if estimator == "reinforce_pp_baseline":  # minus the group mean; a uniform group gives 0
            base = list(scores)
            for members in groups.values():
                vals = [scores[i] for i in members]
                for i in members:
                    base[i] = 0.0 if len(set(vals)) == 1 else scores[i] - sum(vals) / len(vals)
            scores = base
        for i in range(rows):
            n = lengths[i]
            reward = [-kl_coef * kl[i][t] + (scores[i] if t == n - 1 else 0.0) for t in range(n)]
            running = 0.0
            for t in reversed(range(n)):
                if estimator == "gae":
                    after = float(b["values"][i, t + 1]) if t + 1 < n else 0.0
                    delta = reward[t] + GAMMA * after - float(b["values"][i, t])
                    running = delta + GAMMA * LAM * running
                else:  # REINFORCE++: discounted return of the token rewards
                    running = reward[t] + GAMMA * running
                out[i, t] = running
        if estimator != "gae":  # REINFORCE++ always whitens its returns over the batch
            return whiten(out, mask, centre=True)
        return whiten(out, mask, centre=True) if whiten_adv else out
    penalised = [scores[i] - kl_coef * sum(kl[i]) for i in range(rows)]
    for members in groups.values():
        if len({scores[i] for i in members}) == 1 and kl_coef == 0:
            continue  # no signal: 0
        vals = [penalised[i] for i in members]
        mean = sum(vals) / len(vals)
        for i in members:
            if estimator == "grpo":
                std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
                adv = (penalised[i] - mean) / (std + 1e-6)
            elif estimator == "dr_grpo":
                adv = penalised[i] - mean
            else:  # rloo: minus the mean of the others
                adv = penalised[i] - (sum(vals) - penalised[i]) / (len(vals) - 1)
            out[i, : lengths[i]] = adv
    return whiten(out, mask, centre=False) if whiten_adv else out


@pytest.mark.parametrize("whiten_adv", [False, True])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_match_a_per_row_loop(estimator, whiten_adv):
    b = batch()
    kl_coef = 0.0 if estimator == "grpo" else 0.1  # grpo refuses a KL in the reward (below)
    algo = AlgorithmConfig(advantage_estimator=estimator, kl_coef=kl_coef, gamma=GAMMA, lam=LAM,
                           whiten_advantages=whiten_adv)
    out = estimate_advantages(algo, scores=b["scores"], group_index=b["group_index"], mask=b["mask"],
                              old_logprobs=b["old_logprobs"], ref_logprobs=b["ref_logprobs"],
                              values=b["values"] if estimator == "gae" else None, kl_coef=kl_coef)
    torch.testing.assert_close(out.advantages, naive(estimator, b, kl_coef, whiten_adv), atol=1e-10, rtol=1e-9)
    assert (out.returns is not None) == (estimator == "gae")
    # kl/value, what the adaptive controller steers by, is the mean over rows of each row's summed k1.
    per_row = [sum(float(b["old_logprobs"][i, t] - b["ref_logprobs"][i, t]) for t in range(n))
               for i, n in enumerate(b["lengths"])]
    assert out.metrics["kl/value"] == pytest.approx(sum(per_row) / len(per_row), rel=1e-12)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_whitened_group_advantages_leave_a_group_without_signal_at_zero(estimator):
    """Right answers short, wrong ones long: the token mean of the advantages is not 0, and
    subtracting it would push every token of an all-wrong group the same way."""
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # group 1 all wrong
    lengths = torch.tensor([2, 7, 2, 7, 7, 7, 7, 7])
    mask = (torch.arange(8)[None] < lengths[:, None]).float()
    algo = AlgorithmConfig(advantage_estimator=estimator, whiten_advantages=True)
    out = estimate_advantages(algo, scores=scores, group_index=torch.arange(8) // 4, mask=mask,
                              old_logprobs=torch.zeros(8, 8), ref_logprobs=None, values=None, kl_coef=0.0)
    assert out.advantages[4:].abs().max() == 0
    assert (out.advantages[0, :2] > 0).all() and (out.advantages[1, :7] < 0).all()


@pytest.mark.parametrize("estimator", ["dr_grpo", "rloo"])
def test_a_kl_penalty_in_a_uniform_group_scales_with_its_coefficient(estimator):
    b = batch()
    uniform = slice(0, 4)  # every sample of group 0 scores 1
    sizes = []
    for coef in (1e-4, 1e-2):
        algo = AlgorithmConfig(advantage_estimator=estimator, kl_coef=coef)
        out = estimate_advantages(algo, scores=b["scores"], group_index=b["group_index"], mask=b["mask"],
                                  old_logprobs=b["old_logprobs"], ref_logprobs=b["ref_logprobs"], values=None,
                                  kl_coef=coef)
        sizes.append(float(out.advantages[uniform].abs().max()))
    assert 0 < sizes[0] < 1e-3 and sizes[1] == pytest.approx(100 * sizes[0], rel=1e-6)


def test_grpo_refuses_a_kl_penalty_in_the_reward():
    """Divided by a group's reward std, the penalty of a group with equal rewards would be blown
    up to unit size whatever the coefficient (0.56 mean |advantage| at kl_coef=1e-4, measured)."""
    with pytest.raises(ConfigError, match="kl_place=loss"):
        load_config(None, ["algorithm.advantage_estimator=grpo", "algorithm.kl_coef=0.01"])
    for ok in (["algorithm.kl_place=loss", "algorithm.kl_estimator=k3"], ["algorithm.advantage_estimator=dr_grpo"],
               ["algorithm.advantage_estimator=rloo"]):
        load_config(None, ["algorithm.advantage_estimator=grpo", "algorithm.kl_coef=0.01", *ok])


def test_k1_as_a_loss_term_is_refused():
    """Its gradient, the score function on samples of the policy, is 0 in expectation."""
    with pytest.raises(ConfigError, match="k1 as a loss term"):
        load_config(None, ["algorithm.kl_coef=0.01", "algorithm.kl_place=loss", "algorithm.advantage_estimator=rloo"])
    load_config(None, ["algorithm.kl_coef=0.01", "algorithm.kl_place=loss", "algorithm.kl_estimator=k2",
                       "algorithm.advantage_estimator=rloo"])
    load_config(None, ["algorithm.kl_coef=0.01", "algorithm.advantage_estimator=rloo"])  # k1 in the reward
