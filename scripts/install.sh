#!/usr/bin/env bash
# Install the project and its test tools into the current Python environment.
#
# A torch that is already installed stays, so a CUDA build on a GPU machine is kept.
# Without one, torch 2.13.0 is installed: on the project's CPU machines pip takes a
# local CPU build of that release, where an unpinned torch would pull a CUDA build of
# several GB.
set -euo pipefail
cd "$(dirname "$0")/.."

if python -c "import torch" 2>/dev/null; then
    echo "Keeping the installed torch $(python -c 'import torch; print(torch.__version__)')"
else
    python -m pip install "torch==2.13.0"
fi

python -m pip install -e ".[dev]" "$@"
