"""A reward for the GRPO end-to-end tests, named by dotted path in their configs
(`--config.grpo.rewards=grpo_test_rewards.digit_fraction:1.0`): an untrained model's completions differ
in it from sample to sample, so every group carries a learning signal."""


def digit_fraction(prompt: str, completion: str, example: dict) -> float:
  del prompt, example
  return sum(c.isdigit() for c in completion) / max(len(completion), 1)
