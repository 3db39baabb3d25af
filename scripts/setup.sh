#!/usr/bin/env bash
# Creates .venv with kmnist and everything its commands and tests use. Without a GPU it installs
# torch's CPU build (the default Linux wheel from PyPI pulls several GB of CUDA libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
wheels=$(mktemp -d)  # a copy of torch's wheel, if this machine has one, to tell which build to install
trap 'rm -rf "$wheels"' EXIT
if .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing $TORCH with CUDA"
    "${pip[@]}" install "$TORCH"
elif "${pip[@]}" download --no-deps --no-index -d "$wheels" "$TORCH" >/dev/null 2>&1; then
    echo "setup: no GPU; installing the CPU build of $TORCH found on this machine"
    "${pip[@]}" install "$TORCH"
else
    echo "setup: no GPU; installing the CPU build of $TORCH from $TORCH_CPU_INDEX"
    "${pip[@]}" install "$TORCH" --index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple
fi
"${pip[@]}" install -e ".[sweep,serve,export,test]"
.venv/bin/python -c "import kmnist, torch; print(f'setup: kmnist {kmnist.__version__} with torch {torch.__version__} ready in .venv')"
