"""Flax Llama/Mistral causal LMs with stacked decoder layers (nothing here knows about BEEAR)."""
