# Sourced by scripts/run, scripts/prepare and scripts/cchat from the project directory: sets UV to the uv on the
# PATH, else to the pinned uv in a private virtual environment, .cache/uv-venv, made with the system's python3 on
# first use (Debian 12 and Ubuntu 24.04 refuse `pip install` into their own python, PEP 668), and defines `uv`
# (`exec` needs "$UV"). uv downloads no Python: the system's is used.
export UV_PYTHON_DOWNLOADS=never
uv_version=0.13.9
if command -v uv >/dev/null 2>&1; then
  UV="$(command -v uv)"
else
  UV="$PWD/.cache/uv-venv/bin/uv"
  if [ "$("$UV" --version 2>/dev/null)" != "uv $uv_version" ]; then
    if ! python3 -c 'import ensurepip' 2>/dev/null; then
      echo "python3 cannot make a virtual environment here (no ensurepip): install Debian's or Ubuntu's" \
        "python3-venv package (apt-get install python3-venv), or put uv on the PATH" >&2
      exit 1
    fi
    rm -rf .cache/uv-venv
    python3 -m venv .cache/uv-venv
    .cache/uv-venv/bin/pip install --quiet --disable-pip-version-check "uv==$uv_version"
  fi
fi
uv() { "$UV" "$@"; }
