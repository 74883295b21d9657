import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
CASES = FIXTURES / "cases"
sys.path.insert(0, str(TESTS))  # tests import reference_na and helpers as plain modules


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
