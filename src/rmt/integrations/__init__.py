"""rmt inside other training frameworks.

- `rmt.integrations.trl`: RMT's prompts, budget, curriculum, rewards and NTP term for TRL's `GRPOTrainer`
  (`pip install 'rmt[trl]'`).

Nothing is imported here, so `import rmt.integrations` works without any framework installed.
"""
