#!/usr/bin/env bash
# Build an offline Python 3.11 base image (Debian bookworm) for the Docker tests, where Docker
# Hub (and so `python:3.11-slim`) cannot be pulled.
#
#   scripts/build-base-image.sh [--force] [TAG]      TAG defaults to sierra-prefect/base:bookworm
#
# Does nothing if TAG is already present (unless --force). Otherwise:
#   debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,... bookworm ROOTFS MIRROR
# with MIRROR taken from the machine's own apt sources (/etc/apt/sources.list and
# /etc/apt/sources.list.d/*.list|*.sources), then adds the host's extra CA certificates (a
# TLS-intercepting gateway's, for instance) to the rootfs trust store, and imports the rootfs
# with `docker import`. Then use it as `--build-arg BASE_IMAGE=sierra-prefect/base:bookworm`.
#
# In the image: python3 3.11 (Debian's), `python` (python-is-python3), `pip`/`pip3` (Debian's,
# which refuses to install into the system Python: PEP 668; the Dockerfile makes a venv),
# ca-certificates with the host's extra CAs, apt sources for the same mirror.
#
# Needs (Debian, as root): apt-get install -y debootstrap docker.io; a running engine
# (scripts/docker-engine.sh).
#
# Environment:
#   SIERRA_PREFECT_DEBIAN_MIRROR   mirror URL to use instead of the one found in apt's sources
#   SIERRA_PREFECT_BASE_SUITE      Debian suite (default bookworm)
#   SIERRA_PREFECT_CA_BUNDLE       CA bundle whose extra certificates go in (default
#                                  /etc/ssl/certs/ca-certificates.crt)
set -euo pipefail

SUITE="${SIERRA_PREFECT_BASE_SUITE:-bookworm}"
CA_BUNDLE="${SIERRA_PREFECT_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
PACKAGES="python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
FORCE=0
TAG=""
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h | --help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option: $arg" >&2; exit 2 ;;
        *) TAG="$arg" ;;
    esac
done
TAG="${TAG:-sierra-prefect/base:$SUITE}"

log() { printf 'build-base-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The Debian mirror apt uses here: the first enabled `deb` source for $SUITE itself (not
# -updates/-security), from one-line .list files or deb822 .sources files.
find_mirror() {
    local f
    local -a files=()
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] && files+=("$f")
    done
    for f in "${files[@]}"; do
        case "$f" in
            *.sources)
                # deb822: stanzas separated by blank lines; comment lines start with '#'.
                awk -v suite="$SUITE" '
                    function flush() {
                        if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") &&
                            tolower(enabled) != "no" && uris != "") {
                            split(uris, u, " "); print u[1]; found = 1; exit
                        }
                        types = ""; suites = ""; uris = ""; enabled = ""
                    }
                    /^[[:space:]]*#/ { next }
                    /^[[:space:]]*$/ { flush(); next }
                    {
                        key = $0; sub(/:.*/, "", key); val = $0; sub(/^[^:]*:[[:space:]]*/, "", val)
                        key = tolower(key)
                        if (key == "types") types = val
                        else if (key == "suites") suites = val
                        else if (key == "uris") uris = val
                        else if (key == "enabled") enabled = val
                    }
                    END { if (!found) flush() }
                ' "$f"
                ;;
            *)
                # one-line: deb [options] uri suite component...
                awk -v suite="$SUITE" '
                    $1 == "deb" {
                        i = 2
                        if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
                        if ($(i + 1) == suite) { print $i; exit }
                    }
                ' "$f"
                ;;
        esac
    done | grep -E '^(https?|ftp|file)://' | head -n 1
}

command -v docker >/dev/null || die "docker CLI not found (apt-get install -y docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers: run scripts/docker-engine.sh first"

if [[ "$FORCE" == 0 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    log "$TAG is already present; nothing to do (--force to rebuild)"
    exit 0
fi

command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install -y debootstrap)"
[[ "$(id -u)" == 0 ]] || die "debootstrap needs root"
[[ -r "$CA_BUNDLE" ]] || die "CA bundle $CA_BUNDLE not readable"

MIRROR="${SIERRA_PREFECT_DEBIAN_MIRROR:-$(find_mirror || true)}"
if [[ -z "$MIRROR" ]]; then
    MIRROR="http://deb.debian.org/debian"
    log "no '$SUITE' source found in apt's sources; falling back to $MIRROR"
fi
log "suite $SUITE, mirror $MIRROR, tag $TAG"

T0=$SECONDS
WORK="$(mktemp -d /var/tmp/sierra-prefect-rootfs.XXXXXX)"
cleanup() { rm -rf --one-file-system "$WORK"; }
trap cleanup EXIT
ROOTFS="$WORK/rootfs"

log "debootstrap into $ROOTFS (log $WORK/debootstrap.log)"
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1; then
    tail -n 40 "$WORK/debootstrap.log" >&2
    [[ -f "$ROOTFS/debootstrap/debootstrap.log" ]] && tail -n 40 "$ROOTFS/debootstrap/debootstrap.log" >&2
    die "debootstrap failed"
fi
T_DEBOOTSTRAP=$((SECONDS - T0))

# Extra CAs: the host bundle's certificates that Debian's own bundle lacks go to
# /usr/local/share/ca-certificates, so they survive any later update-ca-certificates run in a
# derived image (a plain copy of the bundle would be overwritten then).
python3 - "$CA_BUNDLE" "$ROOTFS/etc/ssl/certs/ca-certificates.crt" \
    "$ROOTFS/usr/local/share/ca-certificates" <<'EOF'
import os, re, sys
host, image, outdir = sys.argv[1:]
pem = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)
norm = lambda b: "".join(b.split())
have = {norm(b) for b in pem.findall(open(image).read())}
extra = [b for b in pem.findall(open(host).read()) if norm(b) not in have]
os.makedirs(outdir, exist_ok=True)
for i, b in enumerate(extra):
    with open(os.path.join(outdir, f"sierra-prefect-host-{i}.crt"), "w") as f:
        f.write(b + "\n")
print(f"build-base-image: {len(extra)} extra CA certificate(s) from the host bundle", file=sys.stderr)
EOF
if ! chroot "$ROOTFS" /usr/sbin/update-ca-certificates >"$WORK/update-ca.log" 2>&1; then
    cat "$WORK/update-ca.log" >&2
    log "update-ca-certificates failed in the rootfs; copying the host bundle instead"
    cp "$CA_BUNDLE" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
fi

# Same apt sources as the host's mirror, for derived images that apt-get install.
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$ROOTFS/etc/apt/sources.list"
# Slim it: no package cache, no lists (a derived image runs apt-get update first anyway).
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
    "$ROOTFS"/var/log/* "$ROOTFS"/tmp/* "$ROOTFS"/debootstrap

log "importing as $TAG"
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase $SUITE from $MIRROR" \
    - "$TAG" >/dev/null

# Check what the Dockerfile relies on.
docker run --rm --network none "$TAG" sh -c \
    'python --version && python3 -m pip --version && pip --version >/dev/null && python3 -m venv --help >/dev/null && test -s /etc/ssl/certs/ca-certificates.crt' >&2 ||
    die "the imported image lacks python/pip/venv/CA bundle"

log "done in $((SECONDS - T0))s (debootstrap ${T_DEBOOTSTRAP}s); size $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
