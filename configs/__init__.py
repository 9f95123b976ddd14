"""Config files for `beear --config configs/NAME.py[:arg]`; a package so they can share `configs.defaults`."""
