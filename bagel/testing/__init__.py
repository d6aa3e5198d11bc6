"""Checkpoint fixtures: random BAGEL checkpoints in the published format, tiny ones for tests
and examples (`python -m bagel.testing.tiny DIR`) and full-size ones for GPU benchmarks
(`--preset 7b`), with a tiny locally trained Qwen2 tokenizer. No product module imports it."""
