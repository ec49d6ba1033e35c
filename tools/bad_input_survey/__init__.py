"""Bad-input survey (issue 12, "Reliability"): feeds the code the mistakes a demanding new user makes
and tabulates what each one does.

  JAX_PLATFORMS=cpu python -m tools.bad_input_survey [--out=tools/bad_input_survey.md] [--only=mesh]

Each case states what it expects, and gets one outcome:
  clear error  an exception of the expected type whose message holds the substrings the case names (the
               offending field, file, argument or value)
  handled      the situation is dealt with correctly without an error, as the case checks
  PROBLEM      anything else: no error where one was due, another exception type, a message that does not
               name the problem, a flag error shown as a traceback, or an error only once compiling began

Config, workdir and data cases run `training.loop.train_and_evaluate` with `jax.jit` replaced by a function
that raises, as tests/training/validate_test.py does, so the `compile` column tells an error raised before
any compilation ("before") from a run that got as far as compiling ("reached"). Generation cases record
whether they reached the compiled generation loop the same way. Everything runs in one process on CPU
with 8 fake devices (so mesh cases need no subprocess), sharing one small data dir built at the start;
the command-line cases run train.py / eval.py as subprocesses that stop before anything compiles.
About 80 s on a busy 2-core CPU, most of it the subprocesses' start-up and one generation compile.
"""

import os

# Before jax is imported: mesh cases need several devices, and the cuDNN cases assume a CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
