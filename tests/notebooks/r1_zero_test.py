"""notebooks/r1_zero.ipynb runs top to bottom at the test sizes (a base run, GRPO from it, the comparison)."""

import json
import re

import pytest

import notebook_testlib as lib

NOTEBOOK = lib.REPO / "notebooks" / "r1_zero.ipynb"
STEPS = 4


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("r1_zero")
  env = {"R1_SMALL": "1", "R1_BASE_STEPS": str(STEPS), "R1_GRPO_STEPS": str(STEPS), "R1_EVAL_EXAMPLES": "8",
         "R1_WORKDIR": str(tmp / "run"), "R1_DATA_DIR": str(tmp / "tfds")}
  return lib.execute(NOTEBOOK, env, timeout=600), tmp / "run"


def test_runs_without_errors_and_plots_the_reward(executed):
  nb, workdir = executed
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(out.output_type != "error" for c in code for out in c.outputs)
  assert "nothing to install" in "\n".join(lib.text(c) for c in code)
  assert (workdir / "grpo" / "reward.png").is_file()
  images = [out for c in code for out in c.outputs if "image/png" in out.get("data", {})]
  assert len(images) == 1


def test_grpo_logged_every_step(executed):
  _, workdir = executed
  rows = [json.loads(line) for line in (workdir / "grpo" / "metrics.jsonl").read_text().splitlines() if line.strip()]
  assert sorted({r["step"] for r in rows if "grpo/reward_mean" in r}) == list(range(1, STEPS + 1))
  assert any("eval/accuracy" in r for r in rows)


def test_prints_both_accuracies(executed):
  nb, _ = executed
  text = "\n".join(lib.text(c) for c in nb.cells if c.cell_type == "code")
  match = re.search(r"^arithmetic accuracy: base (\S+), grpo (\S+)$", text, re.MULTILINE)
  assert match, text[-2000:]
  for value in match.groups():
    assert 0.0 <= float(value) <= 1.0
