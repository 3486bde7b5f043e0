# Sourced by the scripts: the project's Python environment. An active virtualenv ($VIRTUAL_ENV)
# is used as it is; otherwise ./.venv, created with the first python3 on PATH (on Debian that
# needs python3-venv, which scripts/setup.sh installs). Never an interpreter's own site-packages:
# Debian's /usr/bin/python3 is externally managed (PEP 668). Sets TTENV_VENV and TTENV_PY.
if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  TTENV_VENV="$VIRTUAL_ENV"
else
  TTENV_VENV="$PWD/.venv"
  if [ ! -x "$TTENV_VENV/bin/python" ]; then
    echo "setup: creating the virtualenv $TTENV_VENV ($(command -v python3))"
    python3 -m venv "$TTENV_VENV" || { echo "setup: python3 -m venv failed: apt-get install python3-venv" >&2; exit 1; }
  fi
fi
TTENV_PY="$TTENV_VENV/bin/python"
export PATH="$TTENV_VENV/bin:$PATH"
