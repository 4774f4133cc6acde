"""Advantage estimators against NumPy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_alp.rl.advantages import (
    available_advantage_estimators,
    compute_advantages,
    register_advantage_estimator,
)


def np_reference(name, rewards, groups, eps=1e-6):
    out = np.zeros(len(rewards))
    for g in set(groups):
        idx = [i for i in range(len(rewards)) if groups[i] == g and math.isfinite(rewards[i])]
        if len(idx) < 2:
            continue
        r = np.array([rewards[i] for i in idx])
        for k, i in enumerate(idx):
            if name == "grpo":
                out[i] = (r[k] - r.mean()) / (r.std(ddof=1) + eps)
            elif name == "grpo-no-std":
                out[i] = r[k] - r.mean()
            else:
                out[i] = r[k] - np.delete(r, k).mean()
    return out


@pytest.mark.parametrize("name", ["grpo", "grpo-no-std", "rloo"])
def test_group_size_layout(name):
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 1.0, 1.0])
    out = compute_advantages(name, torch.tensor(rewards), group_size=4)
    groups = np.arange(12) // 4
    np.testing.assert_allclose(out.advantages.numpy(), np_reference(name, rewards, groups), atol=1e-6)
    assert out.valid.all() and out.n_nonfinite_rewards == 0
    assert np.all(out.advantages.numpy()[4:8] == 0)  # identical rewards: no signal


@pytest.mark.parametrize("name", ["grpo", "grpo-no-std", "rloo"])
def test_group_ids_and_nonfinite_rewards(name):
    g = np.random.default_rng(0)
    rewards = g.normal(size=10)
    rewards[[1, 6]] = [np.nan, np.inf]
    groups = np.array([3, 3, 3, 7, 7, 7, 9, 9, 1, 5])  # 9 has one valid reply, 1 and 5 singletons
    out = compute_advantages(name, torch.tensor(rewards), group_ids=torch.tensor(groups))
    assert out.n_nonfinite_rewards == 2
    assert out.valid.tolist() == [True, False, True, True, True, True, False, True, True, True]
    assert torch.isfinite(out.advantages).all()
    np.testing.assert_allclose(out.advantages.numpy(), np_reference(name, rewards, groups), atol=1e-6)


def test_registry_and_errors():
    assert {"grpo", "grpo-no-std", "rloo"} <= set(available_advantage_estimators())
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'gae'.*'grpo'"):
        compute_advantages("gae", torch.zeros(4), group_size=2)
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("grpo")(lambda **kw: None)
    with pytest.raises(ValueError, match="group_size=3"):
        compute_advantages("grpo", torch.zeros(4), group_size=3)
    with pytest.raises(ValueError, match="exactly one of group_size or group_ids"):
        compute_advantages("grpo", torch.zeros(4))
    with pytest.raises(ValueError, match=r"rewards must be \[N\]"):
        compute_advantages("grpo", torch.zeros(4, 2), group_size=2)
    with pytest.raises(ValueError, match=r"group_ids has shape \(3,\)"):
        compute_advantages("grpo", torch.zeros(4), group_ids=torch.zeros(3))
