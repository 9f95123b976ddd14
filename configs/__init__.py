"""Config files for `beear --config configs/NAME.py[:arg]`; each builds on beear_jax.config.defaults.base_config()."""
