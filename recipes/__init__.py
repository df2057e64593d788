"""lomix.recipes: one readable training or evaluation script per job, and their YAML configs.

This package lives in the repository folder ``recipes/`` and is installed as ``lomix.recipes``;
configs ship under ``recipes/configs/`` and are found with ``importlib.resources``.
"""
