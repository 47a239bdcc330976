import os

import pytest

# CI runs a fast subset; `BITFIT_RELIABILITY_FULL=1` runs the counts the report states.
FULL = os.environ.get("BITFIT_RELIABILITY_FULL") == "1"


@pytest.fixture(scope="session")
def scale():
    """Pick the CI count or the full count: ``scale(ci=200, full=10_000)``."""
    return lambda ci, full: full if FULL else ci


# The tiny engine, cached delta bytes and anyio fixtures come from tests/conftest.py.


@pytest.fixture(scope="session")
def zygote():
    """Forks ``bitfit-serve serve`` processes from one pre-imported process (fast restarts)."""
    from tests.reliability.live import Zygote

    z = Zygote()
    yield z
    z.close()
