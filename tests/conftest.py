"""Test setup: 8 simulated CPU devices (set before jax is imported) and float32 matmuls."""

import os

# XLA:CPU's concurrency-optimized scheduler can order the collectives of simulated devices differently
# per device and deadlock (seen: inner.share_prompt=False on a (2, 2, 2) mesh, 10 of 12 tries); the
# default scheduler does not.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax

jax.config.update("jax_default_matmul_precision", "highest")
