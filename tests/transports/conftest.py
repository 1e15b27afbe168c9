import pytest
from loguru import logger


@pytest.fixture
def warnings():
    """Warning-level log lines emitted during the test."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING", format="{message}")
    yield lines
    logger.remove(sink)
