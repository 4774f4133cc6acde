"""Reward functions by name: ``reward(response_text, answer) -> float`` in [0, 1].

* ``math-verify``: the last ``\\boxed{...}`` of the response, compared with the answer by
  `math-verify <https://github.com/huggingface/Math-Verify>`_ (symbolic equality, the
  paper's reward); 0 when there is no ``\\boxed{}``.
* ``exact-match``: the last ``\\boxed{...}`` (or, without one, the stripped response)
  equals the stripped answer as a string — for generated tasks with canonical answers.

Register more with ``@register_reward("name")``.
"""

from megatron_alp.rewards.builtin import (
    available_rewards,
    get_reward,
    last_boxed,
    register_reward,
)

__all__ = ["available_rewards", "get_reward", "last_boxed", "register_reward"]
