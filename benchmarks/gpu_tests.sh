#!/usr/bin/env bash
# The test suite on a GPU machine whose image has jax (CUDA), flax, optax, orbax and chex but not the
# rest: run from the repo root there, with the two wheel folders carried beside the checkout.
#   Here, first: bash benchmarks/peers/maxtext/prepare.sh .peer/maxtext   (ml_collections, grain, ...)
#   and the test-only wheels into .whl (both folders git-ignored via .git/info/exclude):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl asttokens==3.0.2 comm==0.2.3 debugpy==1.8.22 dm_tree==0.1.10 docstring_parser==0.18.0 executing==2.3.0 fastjsonschema==2.22.3 importlib_resources==7.1.0 ipykernel==7.4.0 ipython==9.18.1 ipython_pygments_lexers==1.1.1 jedi==0.20.1 jsonschema==4.26.0 jsonschema_specifications==2025.9.1 jupyter_client==8.10.0 jupyter_core==5.9.1 matplotlib_inline==0.2.2 nbclient==0.11.0 nbformat==5.11.1 nest_asyncio2==1.7.4 parso==0.8.7 pexpect==4.9.0 platformdirs==4.14.9 prompt_toolkit==3.0.53 ptyprocess==0.7.0 pure_eval==0.2.4 pyzmq==27.3.0 referencing==0.37.0 rpds_py==2026.9.1 simple_parsing==0.1.9 stack_data==0.6.3 tensorflow_datasets==4.9.10 tensorflow_metadata==1.21.0 toml==0.10.2 tornado==6.6.1 traitlets==5.16.1 wcwidth==0.9.4 jinja2==3.1.6 markupsafe==3.0.4
#     (promise 2.3 has only an sdist: `pip wheel --no-deps -w .whl promise==2.3`)
# Pass 1 runs everything but tests/sharding with the GPU as the default backend; pass 2 runs
# tests/sharding on 8 fake CPU devices, which is what those tests are written for. Logs go to $OUT
# (or ./gpu_test_logs).
set -u
OUT=${OUT:-gpu_test_logs}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .peer/maxtext/wheels/*.whl || exit 1
# tokamax 0.0.17 (from the peer's wheels) imports xprof, for benchmarking only: a stub stands in.
mkdir -p /tmp/site/xprof/cli && touch /tmp/site/xprof/__init__.py /tmp/site/xprof/cli/__init__.py
echo "get_kernel_stats_tool = None" > /tmp/site/xprof/cli/tools.py
# Subprocess tests replace PYTHONPATH with the repo: a .pth file keeps /tmp/site visible to them.
echo /tmp/site > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/zz_tmp_site.pth"
export PYTHONPATH=/tmp/site XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m pytest -q -n 4 tests -p no:cacheprovider --ignore=tests/sharding -rfEs --durations=20 \
  > "$OUT/gpu_tests.log" 2>&1; echo "GPU pass rc=$?" >> "$OUT/gpu_tests.log"
JAX_PLATFORMS=cpu python3 -m pytest -q -n 4 tests/sharding -p no:cacheprovider -rfEs \
  > "$OUT/cpu_sharding_tests.log" 2>&1; echo "CPU sharding pass rc=$?" >> "$OUT/cpu_sharding_tests.log"
tail -n 3 "$OUT/gpu_tests.log" "$OUT/cpu_sharding_tests.log"
