#!/usr/bin/env bash
# What only a GPU shows, in one run of under 8 minutes (bench/gpu_check.py); --dry: on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec timeout 480 "$PY" bench/gpu_check.py "$@"
