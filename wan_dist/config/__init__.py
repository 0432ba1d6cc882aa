"""The lowest layer: the presets (families, model and parallel presets, layouts), the run schema registered from
them in Hydra's ConfigStore, `ConfigError` and Hydra's error lines. Imports no other layer."""
