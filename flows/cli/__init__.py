"""`peft-bench`, the command line (`main`, typer): what `run` checks before the flow starts
(`launch`), the console as a person sees it (`console`) and the tables it prints (`display`)."""
