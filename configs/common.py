"""Pieces shared by the config files: the run-level defaults around a model definition."""

import ml_collections


def run_config(model: dict, **run_fields) -> ml_collections.ConfigDict:
  """Wraps model fields (ModelConfig names, see models/config.py) in a run config.

  The model part becomes a frozen `models.ModelConfig` via `models.from_dict(config.model.to_dict())`;
  layers never see the run config.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0  # PRNG seed for initialisation and data order
  config.model = ml_collections.ConfigDict(model)
  config.update(run_fields)
  return config
