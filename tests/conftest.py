"""One scratch directory per pytest session, shared by its xdist workers (see session_scratch.py)."""

import os

import pytest

import session_scratch


@pytest.fixture(scope="session", autouse=True)
def _session_scratch(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  # Under xdist every worker's basetemp is <session basetemp>/popen-gwN: share the session one.
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  session_scratch.set_root(shared / "session_scratch")
  yield
