"""The one typed config (`schema`: pydantic), how it is read from YAML files, `--set`
overrides, mlflow.yaml and the environment (`build`), sweep grids (`sweep`), and the checks run
before anything expensive starts (`preflight`)."""
