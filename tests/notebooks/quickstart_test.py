"""notebooks/quickstart.ipynb runs top to bottom (a short training run) and shows what it promises."""

import pytest

import notebook_testlib as lib

NOTEBOOK = lib.REPO / "notebooks" / "quickstart.ipynb"
STEPS = 30


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("quickstart")
  env = {"QUICKSTART_STEPS": str(STEPS), "QUICKSTART_WORKDIR": str(tmp / "run"),
         "QUICKSTART_DATA_DIR": str(tmp / "tfds")}
  return lib.execute(NOTEBOOK, env, timeout=400), tmp / "run"


def test_runs_without_errors_and_trains(executed):
  nb, workdir = executed
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(out.output_type != "error" for c in code for out in c.outputs)
  text = "\n".join(lib.text(c) for c in code)
  assert "nothing to install" in text  # importable from the checkout: the install cell is a no-op
  assert f"step {STEPS}/{STEPS}" in text and "eval/bits_per_byte" in text
  assert (workdir / "checkpoints" / str(STEPS)).is_dir() and (workdir / "loss.png").is_file()


def test_shows_plots_a_sample_and_matching_eval(executed):
  nb, _ = executed
  images = [out for c in nb.cells if c.cell_type == "code" for out in c.outputs if "image/png" in out.get("data", {})]
  assert len(images) == 2  # loss.png and expert_load.png
  text = "\n".join(lib.text(c) for c in nb.cells if c.cell_type == "code")
  assert f"step {STEPS} sample:\ndef fib(n):" in text
  line = next(l for l in text.splitlines() if l.startswith("bits/byte: eval.py"))
  ours, theirs = (float(part.split()[-1]) for part in line.removeprefix("bits/byte: ").split(", "))
  assert ours == pytest.approx(theirs, abs=1e-5)


def test_prints_the_mla_cache_sizes(executed):
  nb, _ = executed
  text = lib.text([c for c in nb.cells if c.cell_type == "code"][-1])
  assert "tiny: 48 latent vs 320 multi-head" in text
  assert "deepseek_v3: 576 latent vs 40960 multi-head" in text
