# Sourced by scripts/test and scripts/serve: make .venv and install the project into it, only
# redoing the install when pyproject.toml changed. Works on a fresh machine.
# The caller sets EXTRAS (e.g. "test") before sourcing; "$@" stays the caller's own arguments.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${KLEINSERVE_PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
VENV_PY="$ROOT/.venv/bin/python"
EXTRAS="${EXTRAS:-}"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
STAMP=".venv/.kleinserve-installed${EXTRAS:+-$EXTRAS}"
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$WANT" ]; }
# An install with the test extras also serves a plain one.
if ! stamp_ok "$STAMP" && { [ -n "$EXTRAS" ] || ! stamp_ok .venv/.kleinserve-installed-test; }; then
    "$VENV_PY" -m pip install --quiet --upgrade pip
    # torch first, so the project's torch range is already met and pip does not pull a multi-GB CUDA build.
    # GPU users: set KLEINSERVE_TORCH to the CUDA build they want (see README).
    if ! "$VENV_PY" -c "import torch" 2>/dev/null; then
        # shellcheck disable=SC2086 - KLEINSERVE_TORCH may hold pip options
        "$VENV_PY" -m pip install --quiet ${KLEINSERVE_TORCH:-torch==2.13.0}
    fi
    "$VENV_PY" -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
    echo "$WANT" > "$STAMP"
fi
