"""Config files: the defaults (every key), loading, dotted overrides, schema and range checks."""
