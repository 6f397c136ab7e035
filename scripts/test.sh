#!/usr/bin/env bash
# The whole test suite: lint, format check, mypy --strict, pytest on asyncio's loop and on
# uvloop, then pytest again on every other supported Python found on this machine.
# Sets itself up on a fresh machine: needs only python3 with venv and pip.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
venv() {  # venv DIR PYTHON: create DIR with PYTHON if needed and install the project into it
    [ -x "$1/bin/python" ] || "$2" -m venv "$1"
    "$1/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$1/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
}

venv .venv "$PYTHON"
# (one command a line: under set -e a failure before the last command of an && list does not
# stop the script, which let a ruff error through until 2026-11-30's eleventh session)
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict"; .venv/bin/mypy --strict asgi_asynctrace instrumentation sample_app tests benchmarks
echo "== pytest (asyncio loop)"; .venv/bin/python -m pytest -q
echo "== pytest (uvloop)"; ASYNCTRACE_TEST_LOOP=uvloop .venv/bin/python -m pytest -q
echo "== pytest (pure Python: the accelerator turned off, as where no compiler is)"
ASYNCTRACE_PURE_PYTHON=1 .venv/bin/python -m pytest -q

main_version=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
for version in 3.10 3.11 3.12 3.13; do
    [ "$version" = "$main_version" ] && continue
    interpreter=$(ls -d "$HOME"/.pyenv/versions/"$version".*/bin/python 2>/dev/null | tail -n 1 || true)
    if [ -z "$interpreter" ] && command -v "python$version" >/dev/null; then
        interpreter=$(command -v "python$version")
    fi
    if [ -z "$interpreter" ] || ! "$interpreter" -c 'import venv' 2>/dev/null; then
        echo "== Python $version: not on this machine, skipped"
        continue
    fi
    echo "== pytest (Python $version: $interpreter)"
    venv ".venv-$version" "$interpreter"
    ".venv-$version/bin/python" -m pytest -q -p no:cacheprovider
done
echo "== all passed"
