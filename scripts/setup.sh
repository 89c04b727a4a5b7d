#!/usr/bin/env bash
# Create .venv (or $FASTDIFF_VENV) with torch, fastdiff (editable) and everything the tests use.
# Usage: bash scripts/setup.sh          TORCH_SPEC="torch==2.11.0" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FASTDIFF_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }

echo "fastdiff setup: installing $TORCH_SPEC and the core/optional packages into $VENV"
pip_install "$TORCH_SPEC" numpy pytest hypothesis ninja pybind11 setuptools wheel tqdm matplotlib scipy pot
# Lint and type checkers for .ci/run, pinned: a new release brings new findings (.pre-commit-config.yaml matches ruff)
pip_install ruff==0.17.6 mypy==2.4.1
# Peers for the cross-check tests: k-diffusion's sampler module and what it imports (its package
# metadata also pulls in a training stack (wandb, CLIP, ...) that fastdiff never uses).
pip_install --no-deps k-diffusion==0.1.1.post1 torchsde torchdiffeq trampoline
# diffusers (optional): the FastdiffScheduler tests run against its DPMSolverMultistep/Heun schedulers
pip_install "diffusers==0.42.1" \
  || echo "fastdiff setup: diffusers unavailable; the fastdiff.diffusers tests will skip"
if [ "$TORCH_SPEC" = "torch==2.14.1" ]; then   # torchvision pins its torch: only the matching release
  pip_install pillow safetensors "torchvision==0.29.1" "$TORCH_SPEC" \
    || echo "fastdiff setup: torchvision unavailable; the k-diffusion cross-check will skip"
fi
pip_install --no-build-isolation -e .
"$VENV/bin/python" -c "import fastdiff, torch; print(f'fastdiff {fastdiff.__version__} with torch {torch.__version__} ready in $VENV')"
