"""Flax Llama/Mistral/Qwen2/Qwen3 causal LMs with stacked decoder layers (nothing here knows about BEEAR)."""
