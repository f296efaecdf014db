"""A text-classification dataset before the model sees it: reading and validation
(`dataset`), labels as ids or class names (`labels`), and tokenizer loading and batching
(`collate`). The `prepare` stage tokenises and caches through these."""
