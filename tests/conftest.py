"""Call records of servers the tests launch go to a temporary directory, not the checkout."""

import os
import tempfile

import pytest


@pytest.fixture(scope="session", autouse=True)
def call_records_dir():
    with tempfile.TemporaryDirectory(prefix="call-records-") as path:
        old = os.environ.get("CALL_RECORDS")
        os.environ["CALL_RECORDS"] = path
        yield path
        if old is None:
            os.environ.pop("CALL_RECORDS", None)
        else:
            os.environ["CALL_RECORDS"] = old
