"""Numbers from runs: the statistics (`stats`, scipy underneath), per-method aggregates and
paired comparisons with the reference (`aggregate`), and the regression alarm (`regression`)."""
