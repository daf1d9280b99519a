"""The tiny example job, run once per session: its own tests read it, and the real model's
are compared with it (a pretrained model must beat one built from random weights)."""

import pytest

from helpers import run_job


@pytest.fixture(scope="session")
def example_run(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("example"), "protocol-tiny.yaml", "example", timeout=1500)
