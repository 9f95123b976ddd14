"""`python -m beear_jax` is the `beear` command."""

import sys

from beear_jax.cli.main import main

sys.exit(main())
