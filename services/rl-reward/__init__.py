"""rl-reward: reward functions as a service, and the policy that turns verdicts into feedback."""
