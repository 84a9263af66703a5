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
has_torch() { "$VENV_PY" -c "import torch" 2>/dev/null; }

# torch goes in first, so the project's torch range is already met and no multi-GB CUDA build is pulled.
# GPU users: set KLEINSERVE_TORCH to the CUDA build they want (pip arguments, see README).
pip_torch() {
    # shellcheck disable=SC2086 - KLEINSERVE_TORCH may hold pip options
    "$VENV_PY" -m pip install --quiet ${KLEINSERVE_TORCH:-torch==2.13.0}
}

install_with_pip() {
    "$VENV_PY" -m pip install --quiet --upgrade pip
    has_torch || pip_torch
    "$VENV_PY" -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
}

# uv installs in a fraction of pip's time (parallel downloads, unpacking and byte-compiling); pip is the
# fallback whenever uv cannot be had or fails.
install_with_uv() {
    "$VENV_PY" -m pip install --quiet uv || return 1
    # Byte-compiled as pip does: without it every process (each test server) compiles what it imports.
    local uv=("$VENV_PY" -m uv pip install --quiet --compile-bytecode --python "$VENV_PY")
    if ! has_torch; then
        if [ -n "${KLEINSERVE_TORCH:-}" ]; then
            pip_torch || return 1
        else
            # pip chooses torch's files, as pip's own configuration says (it may point at a local CPU
            # wheel that uv does not read); uv installs exactly those.
            local report files
            report="$(mktemp)"
            "$VENV_PY" -m pip install --quiet --dry-run --ignore-installed --report "$report" torch==2.13.0 \
                || return 1
            files="$("$VENV_PY" -c 'import json, sys
print("\n".join(i["download_info"]["url"] for i in json.load(open(sys.argv[1]))["install"]))' "$report")"
            rm -f "$report"
            # shellcheck disable=SC2086 - one URL a line
            "${uv[@]}" --no-deps $files || return 1
        fi
    fi
    "${uv[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
}

# An install with the test extras also serves a plain one.
if ! stamp_ok "$STAMP" && { [ -n "$EXTRAS" ] || ! stamp_ok .venv/.kleinserve-installed-test; }; then
    if ! install_with_uv; then
        echo "scripts: installing with uv failed; installing with pip" >&2
        install_with_pip
    fi
    echo "$WANT" > "$STAMP"
fi
