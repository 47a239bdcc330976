import os

import pytest

# CI runs a fast subset; `BITFIT_RELIABILITY_FULL=1` runs the counts the report states.
FULL = os.environ.get("BITFIT_RELIABILITY_FULL") == "1"


@pytest.fixture(scope="session")
def scale():
    """Pick the CI count or the full count: ``scale(ci=200, full=10_000)``."""
    return lambda ci, full: full if FULL else ci


# The server tests' fixtures (tiny engine, cached delta bytes, anyio on asyncio), shared here.
from tests.server.conftest import anyio_backend, delta_bytes, deltas_dir, engine, hf_base, make_delta  # noqa: E402,F401


@pytest.fixture(scope="session")
def zygote():
    """Forks ``bitfit-serve serve`` processes from one pre-imported process (fast restarts)."""
    from tests.reliability.live import Zygote

    z = Zygote()
    yield z
    z.close()
