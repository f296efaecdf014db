"""Hugging Face peft's methods as `method: peft` (issue #18): a peft config from the `peft:`
block, injected with peft's own `get_peft_model`, and the optimiser variants of
`peft.optimizers`. Our own adapters stay in `peft_modules/`; this is the one place the pipeline
imports HF peft for training."""
