"""One scratch directory per pytest session, shared by its xdist workers (see session_scratch.py)."""

import os

import pytest

import session_scratch

# LLVM optimisation level 0 for every CPU compile of the suite: its workers, the notebook kernels they
# start and (through session_scratch.subprocess_env) the scripts they run. Most tests are compile-bound,
# and this cuts a cold tiny-model compile from ~30 s to ~18 s; XLA's HLO passes (SPMD partitioning
# included) are unchanged, and floating-point results do not depend on it (XLA:CPU compiles without
# fast-math).
session_scratch.add_xla_flag(session_scratch.FAST_COMPILE)


@pytest.fixture(scope="session", autouse=True)
def _session_scratch(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  # Under xdist every worker's basetemp is <session basetemp>/popen-gwN: share the session one.
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  session_scratch.set_root(shared / "session_scratch")
  yield
