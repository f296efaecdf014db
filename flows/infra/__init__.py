"""Servers and processes: the one process supervisor (`supervisor`: start, wait until
healthy, stop, die with the parent), the local Prefect + MLflow stack (`stack`) and the
temporary Prefect server of one run (`tempserver`)."""
