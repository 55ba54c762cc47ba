import io

import pytest

from gateway import logging as gateway_logging
from tests.redis_server import redis_server  # noqa: F401 (a fixture for every test module)


@pytest.fixture(scope="session", autouse=True)
def captured_logs() -> io.StringIO:
    """Every log line of the test session, as JSON, so tests can look for leaks."""
    stream = io.StringIO()
    gateway_logging.configure("debug", "json", stream=stream)
    return stream
