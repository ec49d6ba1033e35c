"""The report: the console rows, the summary and the Markdown file, with run-specific paths redacted."""

from __future__ import annotations

import platform
import re
import socket
import time

import jax

from tools.bad_input_survey.harness import ENV, REPO, Result


def _redact(text: str) -> str:
  """Run-specific paths and names out of messages, so the report reads the same on any machine."""
  text = text.replace(str(ENV.root), "<tmp>").replace(str(REPO), "<repo>")
  text = re.sub(rf"\b{re.escape(socket.gethostname())}\b", "<host>", text)
  return re.sub(r"pid \d+", "pid <pid>", text)


def _row(i: int, r: Result) -> list[str]:
  outcome = r.outcome + (f": {r.why}" if r.why else "")
  return [str(i), r.case.area, r.case.name, outcome, r.compile or "-", _redact(r.message)[:220]]


_COLUMNS = ["#", "area", "case", "outcome", "compile", "first line of the message"]


def _summary(results: list[Result], seconds: float) -> list[str]:
  count = lambda outcome: sum(r.outcome == outcome for r in results)
  before = sum(r.outcome == "clear error" and r.compile == "before" for r in results)
  probed = sum(r.outcome == "clear error" and bool(r.compile) for r in results)
  problems = [r for r in results if r.outcome == "PROBLEM"]
  lines = [f"total cases: {len(results)} (in {seconds:.0f} s)",
           f"clear errors: {count('clear error')} ({before} of the {probed} raised under a compile probe came "
           "before any compilation)",
           f"handled: {count('handled')}",
           f"PROBLEM: {len(problems)}"]
  lines += [f"  - {r.case.area}: {r.case.name} ({r.why})" for r in problems]
  return lines


def _markdown(rows: list[list[str]], controls: list[Result], summary: list[str], command: str) -> str:
  cell = lambda s: s.replace("|", "\\|").replace("\n", " ")
  out = ["# Bad-input survey (issue 12)", "",
         f"Command: `{command}`  ",
         f"Date: {time.strftime('%Y-%m-%d %H:%M')}; Python {platform.python_version()}, jax {jax.__version__}, "
         f"{jax.device_count()} {jax.devices()[0].platform} devices (fake, one process).", "",
         "Outcomes: **clear error** (expected exception type, message names the offending field/file/argument), "
         "**handled** (dealt with correctly without an error, as the case checks), **PROBLEM** (anything "
         "else). `compile`: for cases run under a compile probe, whether the error came *before* any "
         "compilation or the run *reached* it. Paths are shown relative to `<tmp>` (the survey's temporary "
         "directory) and `<repo>`.", "",
         "## Summary", "", *[l if l.startswith("  -") else f"- {l}" for l in summary], "",
         "## Controls", ""]
  out += [f"- {r.case.name}: {r.outcome} ({_redact(r.message)})" for r in controls]
  out += ["", "## Cases", "", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
  out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
  return "\n".join(out) + "\n"
