"""Running a notebook of notebooks/ in a test: executed top to bottom in a kernel with extra environment
variables, and the text its cells printed."""

import os
import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO = pathlib.Path(__file__).resolve().parents[2]


def text(cell) -> str:
  """What a code cell printed: its streams and the plain-text form of its results."""
  parts = []
  for out in cell.get("outputs", []):
    if out.output_type == "stream":
      parts.append(out.text)
    elif "text/plain" in out.get("data", {}):
      parts.append(out.data["text/plain"])
  return "".join(parts)


def execute(notebook: pathlib.Path, env: dict[str, str], timeout: int):
  """The notebook executed with `env` added to the environment (the kernel inherits this process's);
  raises CellExecutionError naming the failing cell."""
  env = {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **env}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    nb = nbformat.read(notebook, as_version=4)
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook.parent)}}).execute()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb
