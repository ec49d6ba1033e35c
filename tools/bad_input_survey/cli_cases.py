"""Command line: train.py and eval.py in subprocesses (each stops before compiling)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tools.bad_input_survey.harness import ENV, REPO, Case


_LOG_LINE = re.compile(r"^[IWE]\d{4} ")  # absl/glog log lines: not part of a message


class CliExit(Exception):
  """A script that exited non-zero; str is its stderr without log lines, headline the line that matters."""

  def __init__(self, rc: int, stderr: str, says):
    super().__init__(stderr)
    lines = [l for l in stderr.splitlines() if l.strip()]
    wanted = [w for want in says for w in (want if isinstance(want, tuple) else (want,))]
    hit = next((l for l in reversed(lines) if any(w in l for w in wanted)), None)  # messages come last
    self.headline = f"exit {rc}: " + (hit or (lines[-1] if lines else "")).strip()
    self.traceback = "Traceback (most recent call last)" in stderr


def _script(name: str, *args: str, says=()):
  def run():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, name, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 0:
      return f"exit 0: {proc.stdout.strip()[-100:]}"
    raise CliExit(proc.returncode, "\n".join(l for l in proc.stderr.splitlines() if not _LOG_LINE.match(l)),
                  says)
  return run


def _no_traceback(e: BaseException) -> str | None:
  return "a flag error shown as a traceback" if getattr(e, "traceback", False) else None


def cli_cases() -> list[Case]:
  work = str(ENV.new_dir("cli_workdir"))
  nowhere = str(ENV.root / "no_such_workdir")
  train = ("train.py", "--config=configs/tiny.py:test")

  def flag_error(name, script, *args, says):
    return Case("command line", name, _script(*script, *args, says=says), (CliExit,), tuple(says),
                _no_traceback)

  def run_error(name, script, *args, says):  # an error of the run, not of a flag: a traceback may come with it
    return Case("command line", name, _script(*script, *args, says=says), (CliExit,), tuple(says))

  data = f"--config.data.data_dir={ENV.data_dir}"
  return [
      flag_error("train.py --config.foo=1 (unknown field)", train, f"--workdir={work}", "--config.foo=1",
                 says=["foo"]),
      flag_error("train.py --config.optim.peak_lrr=1 (typo)", train, f"--workdir={work}",
                 "--config.optim.peak_lrr=1", says=["peak_lrr", "did you mean 'peak_lr'"]),
      flag_error("train.py without --workdir", train, says=["--workdir"]),
      flag_error("train.py without --config", ("train.py",), f"--workdir={work}", says=["--config"]),
      flag_error("train.py --config=configs/nope.py (missing file)", ("train.py", "--config=configs/nope.py"),
                 f"--workdir={work}", says=["configs/nope.py"]),
      flag_error("train.py --config=configs/tiny.py:tset (unknown variant)",
                 ("train.py", "--config=configs/tiny.py:tset"), f"--workdir={work}", says=["tset"]),
      flag_error("train.py --config.total_steps=abc", train, f"--workdir={work}", "--config.total_steps=abc",
                 says=["total_steps", "abc"]),
      flag_error("train.py with a stray positional argument", train, f"--workdir={work}", "extra",
                 says=["extra"]),
      run_error("train.py --config.total_steps=0", train, f"--workdir={work}", data, "--config.total_steps=0",
                says=["total_steps"]),
      flag_error("eval.py --tasks=unknown", ("eval.py",), f"--workdir={nowhere}", "--tasks=arithmetic,unknown",
                 says=["--tasks", "unknown"]),
      flag_error("eval.py with both --workdir and --hf_dir", ("eval.py",), f"--workdir={work}",
                 f"--hf_dir={work}", says=["--workdir", "--hf_dir"]),
      flag_error("eval.py with neither --workdir nor --hf_dir", ("eval.py",), says=["--workdir", "--hf_dir"]),
      flag_error("eval.py --eval_batches=-1", ("eval.py",), f"--workdir={nowhere}", "--eval_batches=-1",
                 says=["--eval_batches", "-1"]),
      flag_error("eval.py --task_examples=0", ("eval.py",), f"--workdir={nowhere}", "--task_examples=0",
                 says=["--task_examples", "0"]),
      flag_error("eval.py --mode=foo", ("eval.py",), f"--workdir={nowhere}", "--mode=foo", says=["--mode", "foo"]),
      flag_error("eval.py --mode=sample --temperature=-1 (and no workdir)", ("eval.py",),
                 f"--workdir={nowhere}", "--mode=sample", "--temperature=-1", says=["temperature"]),
      flag_error("eval.py --mode=sample --top_p=0 (and no workdir)", ("eval.py",),
                 f"--workdir={nowhere}", "--mode=sample", "--top_p=0", says=["top_p"]),
      run_error("eval.py --workdir=<missing directory>", ("eval.py",), f"--workdir={nowhere}",
                says=["no_such_workdir"]),
  ]
