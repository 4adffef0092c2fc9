#!/usr/bin/env bash
# The GPU report, for a lent GPU machine: SmolLM2-135M's and SmolLM2-1.7B's shapes built from configs, bf16;
# Stepwise's training step against Hugging Face Trainer (length-grouped): tok/s, MFU, peak GPU memory;
# and trainer eval's generation tok/s (bench/gpu.py says what each figure is). Nothing is downloaded.
#
#     bash bench/gpu.sh            # on the GPU machine, under 8 minutes (stopped at 7m50s)
#     bash bench/gpu.sh --smoke    # anywhere, a CPU too: the demo shape, a few steps (tests/test_bench.py)
#
# It runs with .venv/bin/python where there is one, else python3 (or $PYTHON). That python needs torch,
# transformers, tokenizers, safetensors, accelerate, peft, rich and yaml; a machine that lacks one can be
# given it as wheels in .whl/, which are installed first (pip install --no-index, into /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/stepwise-site .whl/*.whl
  export PYTHONPATH=/tmp/stepwise-site${PYTHONPATH:+:$PYTHONPATH}
fi
missing=$("$PY" -c '
import importlib.util
need = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "rich", "yaml")
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))')
if [ -n "$missing" ]; then
  echo "bench/gpu.sh: $PY lacks $missing: install it, or put its wheels in .whl/" >&2
  exit 1
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec timeout 470 "$PY" bench/gpu.py "$@"
