"""One scratch directory per pytest session, shared by its xdist workers (see evaltest_util.py)."""

import os

import pytest

import evaltest_util


@pytest.fixture(scope="session", autouse=True)
def _evaluation_scratch(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  # Under xdist every worker's basetemp is <session basetemp>/popen-gwN: share the session one.
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  evaltest_util.set_root(shared / "evaluation_shared")
  yield
