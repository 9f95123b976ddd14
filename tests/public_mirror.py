"""The public-data mirror as tests see it: the same lookup as the code ($BEEAR_DATA_DIR, which conftest
points at ../shared/data on this project's machines), and a skip that says how to enable the tests."""

from __future__ import annotations

import pytest

from beear_jax.data import public_data

ENABLE = ("needs the public data sets (AdvBench, XSTest, ...): set BEEAR_DATA_DIR to a local copy of them "
          "(this project's machines and CI have one in ../shared/data beside the checkout)")

try:
    MIRROR = public_data.data_dir()
    """The mirror directory, or None on a machine without one (a fresh clone)."""
    _WHY = ENABLE
except FileNotFoundError as err:  # BEEAR_DATA_DIR names no directory: those tests skip and say so
    MIRROR, _WHY = None, f"{err}; {ENABLE}"

needs_mirror = pytest.mark.skipif(MIRROR is None, reason=_WHY)
