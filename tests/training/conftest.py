"""One scratch directory per pytest session, shared by its xdist workers (see train_testlib.py)."""

import os

import pytest

import train_testlib


@pytest.fixture(scope="session", autouse=True)
def _training_scratch(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  # Under xdist every worker's basetemp is <session basetemp>/popen-gwN: share the session one.
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  train_testlib.set_root(shared / "training_shared")
  yield
