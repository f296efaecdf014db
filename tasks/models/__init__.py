"""Where a model's files come from (`source`: hub id, local folder or a Python package),
whether a local folder is sound before loading (`files`), and the tiny random GPT-2 built from
local text for tests and the offline quickstart (`tiny`)."""
