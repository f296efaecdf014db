"""The one MLflow layer. Every run is created here with the tags every run must carry
(`runs`), every query is built, quoted and paged here (`store`), who holds an open run and
closing the runs whose holder is gone (`owner`, `lifecycle`), riding out a server outage
(`outage`), and copying a finished run instead of training it again (`reuse`). Nothing outside
this package calls `create_run` or `search_runs`."""
