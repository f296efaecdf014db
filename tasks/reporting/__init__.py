"""What a person reads: the report's tables and its Markdown and HTML (`render`, from the
Jinja templates in `templates/`), the charts (`charts`, `charts_sweep`), folders written without
deleting a user's files (`outdir`), and the winner exported in peft's layout (`export`)."""
