# Shared by scripts/setup.sh and scripts/test.sh (sourced, not run).

# apt_install PACKAGE...: install the Debian packages that are missing (as root, or with sudo).
apt_install() {
    local missing=() p sudo=""
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# find_python VERSION...: print the real path of the first interpreter of these versions.
# The real path, not a pyenv shim: uv compares it with the venv's interpreter, and a shim
# made every second setup remove and rebuild .venv. pyenv's versions count even when they
# are not its global choice.
find_python() {
    local v candidate real
    for v in "$@"; do
        for candidate in "$(command -v "python$v" 2>/dev/null)" \
                         "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/"python$v"; do
            [[ -n "$candidate" && -x "$candidate" ]] || continue
            real=$("$candidate" -c 'import sys; print(sys.executable)' 2>/dev/null) || continue
            [[ -n "$real" ]] && { echo "$real"; return 0; }
        done
    done
    return 1
}

# uv_sync ARGS...: `uv sync` from the lock, compiling bytecode, installing uv first if needed.
uv_sync() {
    local uv=(uv) py
    if ! command -v uv >/dev/null; then
        py=$(find_python 3.11 3.12 3.13 || command -v python3)
        "$py" -m pip install -q uv
        uv=("$py" -m uv)
    fi
    # Use the system CA bundle (a TLS-intercepting proxy's CA lives there, if any).
    [[ -f /etc/ssl/certs/ca-certificates.crt ]] && export SSL_CERT_FILE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
    # --compile-bytecode: write every package's .pyc now. Python would cache them on first
    # import, but not where PYTHONDONTWRITEBYTECODE is set (as on CI here): `import prefect`
    # then compiles from source in every process, 2.3 s instead of 1.1 s.
    "${uv[@]}" sync --frozen --compile-bytecode "$@"
}
