"""The arithmetic example's own code: a metric function and a GRPO reward, by import path
(``arithmetic.checks:work_is_right``, ``arithmetic.rewards:close_answer``) from examples/arithmetic.yaml."""
