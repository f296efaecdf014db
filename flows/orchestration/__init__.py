"""How a benchmark's runs are laid out and started: the jobs (`jobs`), a sweep's first phase
(`sweeping`), dispatch to a deployment's workers (`dispatch`) and the plan without training
(`plan`)."""
