#!/usr/bin/env bash
# Builds .venv-timm (torch 2.14.1 + torchvision 0.29.1 + timm; a large download on machines without them
# cached) and runs the real-timm conversion check.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TIMM_VENV:-.venv-timm}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 timm safetensors numpy
fi
exec "$VENV/bin/python" scripts/timm_parity.py "$@"
