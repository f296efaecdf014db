"""The one typed config (`schema`: pydantic), how it is read from YAML files, `--set`
overrides, mlflow.yaml and the environment (`build`), and sweep grids (`sweep`). It depends on
nothing else in `tasks` but `common`: every other package reads it."""
