# Sourced by scripts/test and scripts/serve: make .venv and install the project into it,
# only redoing the install when pyproject.toml changed. Works on a fresh machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${KLEINSERVE_PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
VENV_PY="$ROOT/.venv/bin/python"
EXTRAS="${1:-}"
STAMP=".venv/.kleinserve-installed${EXTRAS:+-$EXTRAS}"
WANT="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    "$VENV_PY" -m pip install --quiet --upgrade pip
    # torch first, so the project's torch range is already met and pip does not pull a multi-GB CUDA build.
    # GPU users: set KLEINSERVE_TORCH to the CUDA build they want (see README).
    if ! "$VENV_PY" -c "import torch" 2>/dev/null; then
        "$VENV_PY" -m pip install --quiet "${KLEINSERVE_TORCH:-torch==2.13.0}"
    fi
    "$VENV_PY" -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
    echo "$WANT" > "$STAMP"
fi
