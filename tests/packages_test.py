"""The packages' import graph (read from the source, nothing imported): models/ depends on no other
package of the project, and no two packages import each other, directly or through others."""

import ast
import pathlib

from absl.testing import absltest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("models", "sharding", "training", "inference", "evaluation", "data", "configs", "tools", "benchmarks")


def imported_packages(package: str) -> dict[str, set[str]]:
  """{module path: project packages it imports (function-level imports included)}."""
  out = {}
  for path in sorted((REPO / package).rglob("*.py")):
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names.update(alias.name.split(".")[0] for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names.add(node.module.split(".")[0])
    out[str(path.relative_to(REPO))] = {n for n in names if n in PACKAGES and n != package}
  return out


def package_graph() -> dict[str, set[str]]:
  return {p: set().union(*imported_packages(p).values()) for p in PACKAGES}


class PackagesTest(absltest.TestCase):

  def test_models_import_no_other_package(self):
    offenders = {m: deps for m, deps in imported_packages("models").items() if deps}
    self.assertEqual(offenders, {})

  def test_no_cycles_between_packages(self):
    graph = package_graph()

    def reaches(start, goal, seen=()):
      return any(d == goal or (d not in seen and reaches(d, goal, seen + (d,))) for d in graph[start])

    cycles = sorted(p for p in PACKAGES if reaches(p, p))
    self.assertEqual(cycles, [], f"packages on an import cycle; graph: {graph}")

  def test_the_graph_is_read(self):
    """Guards the two tests above against a parser that sees nothing."""
    graph = package_graph()
    self.assertIn("models", graph["sharding"])
    self.assertIn("models", graph["training"])
    self.assertIn("training", graph["evaluation"])


if __name__ == "__main__":
  absltest.main()
