#!/usr/bin/env bash
# Install Zhiku into .venv (created if missing). `--dev` adds the test and lint tools and the headless
# browser the UI tests drive (Debian's chromium, with CJK fonts so screenshots show Chinese).
# torch is installed first, alone and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "torch==$(sed -n 's/^torch==//p' requirements.txt)"
# llama-cpp-python compiles llama.cpp on first install (minutes); pip caches the wheel afterwards
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "${PIP[@]}" -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
  "${PIP[@]}" -r requirements-dev.txt
  if [ ! -x /usr/bin/chromium ]; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-noto-cjk >/dev/null
  fi
fi
