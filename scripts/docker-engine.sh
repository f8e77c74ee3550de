#!/usr/bin/env bash
# Make sure a Docker engine is usable for sierra-prefect's Docker tests.
#
#   scripts/docker-engine.sh [start]   idempotent: use a working engine, or start our own dockerd
#   scripts/docker-engine.sh stop      stop only the dockerd this script started (pid in its pidfile)
#   scripts/docker-engine.sh status    say whether an engine answers and whether ours runs
#   scripts/docker-engine.sh env       print `export DOCKER_HOST=...` for eval
#
# `start` prints exactly one line on stdout, DOCKER_HOST=<url>, the engine to use; everything
# else goes to stderr. So: export "$(scripts/docker-engine.sh start)".
#
# Needs (Debian bookworm, as root): apt-get install -y docker.io
# (pulls in containerd, runc, iptables, tini; docker-compose and debootstrap are separate
# packages, needed only by the compose tests and scripts/build-base-image.sh).
#
# The dockerd started here is made for a sandboxed machine without a bridge or NAT: it runs with
# --bridge=none --iptables=false --ip6tables=false, so every container and build must use host
# networking (`docker run --network host`, `docker build --network host`, job variable
# `network_mode: host`). It keeps its own data root, exec root, pidfile, log and config under
# the state dir, and ignores /etc/docker/daemon.json.
#
# Environment:
#   SIERRA_PREFECT_DOCKER_STATE    state dir (default /var/lib/sierra-prefect-docker)
#   SIERRA_PREFECT_DOCKER_SOCK     unix socket path of our dockerd (default /var/run/docker.sock,
#                                  so the docker CLI and docker-py find it with no DOCKER_HOST)
#   SIERRA_PREFECT_DOCKER_TIMEOUT  seconds to wait for the engine to answer / to exit (default 60)
set -euo pipefail

STATE_DIR="${SIERRA_PREFECT_DOCKER_STATE:-/var/lib/sierra-prefect-docker}"
SOCK="${SIERRA_PREFECT_DOCKER_SOCK:-/var/run/docker.sock}"
TIMEOUT="${SIERRA_PREFECT_DOCKER_TIMEOUT:-60}"
DATA_ROOT="$STATE_DIR/data"
EXEC_ROOT="$STATE_DIR/exec"
PIDFILE="$STATE_DIR/dockerd.pid"
LOGFILE="$STATE_DIR/dockerd.log"
CONFIG="$STATE_DIR/daemon.json"
OUR_HOST="unix://$SOCK"

log() { printf 'docker-engine: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# `docker info` against a given DOCKER_HOST (empty = the client's own default), bounded in time.
engine_answers() {
    local host="$1"
    if [[ -n "$host" ]]; then
        DOCKER_HOST="$host" timeout 15 docker info >/dev/null 2>&1
    else
        (unset DOCKER_HOST; timeout 15 docker info >/dev/null 2>&1)
    fi
}

# The pid in our pidfile, if that process is alive and is the dockerd we started (its command
# line names our exec root), so a reused pid is never taken for ours.
our_pid() {
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(tr -dc '0-9' <"$PIDFILE")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--exec-root $EXEC_ROOT " || return 1
    printf '%s\n' "$pid"
}

# containerd that dockerd started for itself (it lives under our exec root).
our_containerd_pid() {
    local f="$EXEC_ROOT/containerd/containerd.pid" pid
    [[ -f "$f" ]] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$EXEC_ROOT/containerd" || return 1
    printf '%s\n' "$pid"
}

wait_for_engine() {
    local deadline=$((SECONDS + TIMEOUT)) pid="$1"
    until engine_answers "$OUR_HOST"; do
        # $pid may be setsid's if it had to fork: dockerd's own pidfile then names the daemon.
        if ! kill -0 "$pid" 2>/dev/null && ! our_pid >/dev/null; then
            log "dockerd (pid $pid) exited; last lines of $LOGFILE:"
            tail -n 30 "$LOGFILE" >&2 || true
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "dockerd (pid $pid) did not answer within ${TIMEOUT}s; last lines of $LOGFILE:"
            tail -n 30 "$LOGFILE" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

cmd_start() {
    # 1. An engine that already answers (DOCKER_HOST, the client's context, or the default
    #    socket) is used as it is.
    if [[ -n "${DOCKER_HOST:-}" ]] && engine_answers "$DOCKER_HOST"; then
        log "engine already answers at $DOCKER_HOST"
        printf 'DOCKER_HOST=%s\n' "$DOCKER_HOST"
        return 0
    fi
    if [[ -z "${DOCKER_HOST:-}" ]] && engine_answers ""; then
        local host
        host="$(docker context inspect --format '{{.Endpoints.docker.Host}}' 2>/dev/null || true)"
        host="${host:-unix:///var/run/docker.sock}"
        log "engine already answers at $host (the docker client's default)"
        printf 'DOCKER_HOST=%s\n' "$host"
        return 0
    fi
    if engine_answers "$OUR_HOST"; then
        log "engine already answers at $OUR_HOST"
        printf 'DOCKER_HOST=%s\n' "$OUR_HOST"
        return 0
    fi

    command -v dockerd >/dev/null || die "dockerd not found: apt-get install -y docker.io"
    command -v docker >/dev/null || die "docker CLI not found: apt-get install -y docker.io"
    [[ "$(id -u)" == 0 ]] || die "starting dockerd needs root"

    mkdir -p "$STATE_DIR" "$DATA_ROOT" "$EXEC_ROOT" "$(dirname "$SOCK")"
    [[ -f "$CONFIG" ]] || printf '{}\n' >"$CONFIG"

    # 2. Ours was started before and is still coming up: wait for it rather than start another.
    local pid
    if pid="$(our_pid)"; then
        log "our dockerd (pid $pid) is running but not answering yet; waiting"
    else
        # A containerd left behind by a dockerd that was killed would make the new one fail.
        local cpid
        if cpid="$(our_containerd_pid)"; then
            log "stopping leftover containerd (pid $cpid) of a previous dockerd"
            kill -TERM "$cpid" 2>/dev/null || true
            wait_gone "$cpid" 20 || kill -KILL "$cpid" 2>/dev/null || true
        fi
        rm -f "$PIDFILE"
        log "starting dockerd (state $STATE_DIR, socket $SOCK, log $LOGFILE)"
        # setsid: own session, so the caller's job control or process-group kills don't reach it.
        setsid dockerd \
            --config-file "$CONFIG" \
            --data-root "$DATA_ROOT" \
            --exec-root "$EXEC_ROOT" \
            --pidfile "$PIDFILE" \
            --host "$OUR_HOST" \
            --bridge=none --iptables=false --ip6tables=false \
            </dev/null >>"$LOGFILE" 2>&1 &
        pid=$!
        # dockerd writes the pidfile itself a moment later; write it now so `stop` works even if
        # we are interrupted before that.
        printf '%s\n' "$pid" >"$PIDFILE.starting"
    fi
    local t0=$SECONDS
    wait_for_engine "$pid" || { rm -f "$PIDFILE.starting"; die "dockerd did not become ready"; }
    rm -f "$PIDFILE.starting"
    log "engine ready after $((SECONDS - t0))s (pid $(our_pid || echo "$pid"), pidfile $PIDFILE)"
    printf 'DOCKER_HOST=%s\n' "$OUR_HOST"
}

# Wait up to $2 seconds for pid $1 to exit; poll, no fixed sleep.
wait_gone() {
    local pid="$1" deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null; do
        # A zombie of ours counts as gone.
        [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]] && return 0
        ((SECONDS >= deadline)) && return 1
        sleep 0.2
    done
}

cmd_stop() {
    local pid
    if ! pid="$(our_pid)"; then
        # Interrupted start: the pid we recorded before dockerd wrote its own pidfile.
        if [[ -f "$PIDFILE.starting" ]]; then
            pid="$(tr -dc '0-9' <"$PIDFILE.starting")"
            if [[ -n "$pid" && -r /proc/$pid/cmdline ]] &&
                tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--exec-root $EXEC_ROOT "; then
                :
            else
                pid=""
            fi
        fi
    fi
    if [[ -z "${pid:-}" ]]; then
        log "no dockerd of ours is running (pidfile $PIDFILE)"
        rm -f "$PIDFILE.starting"
        return 0
    fi
    log "stopping dockerd pid $pid"
    kill -TERM "$pid"
    # dockerd stops running containers (10 s each by default) and its containerd before exiting.
    if ! wait_gone "$pid" "$TIMEOUT"; then
        log "dockerd pid $pid still running after ${TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || die "dockerd pid $pid did not exit"
    fi
    local cpid
    if cpid="$(our_containerd_pid)"; then
        log "stopping containerd pid $cpid left by dockerd"
        kill -TERM "$cpid" 2>/dev/null || true
        wait_gone "$cpid" 20 || kill -KILL "$cpid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE" "$PIDFILE.starting"
    log "stopped"
}

cmd_status() {
    local pid rc=1
    if pid="$(our_pid)"; then
        log "our dockerd: pid $pid (pidfile $PIDFILE, socket $SOCK, log $LOGFILE)"
    else
        log "our dockerd: not running"
    fi
    if [[ -n "${DOCKER_HOST:-}" ]] && engine_answers "$DOCKER_HOST"; then
        log "engine answers at $DOCKER_HOST"; rc=0
    elif engine_answers "$OUR_HOST"; then
        log "engine answers at $OUR_HOST"; rc=0
    else
        log "no engine answers"
    fi
    return $rc
}

cmd_env() {
    if [[ -n "${DOCKER_HOST:-}" ]] && engine_answers "$DOCKER_HOST"; then
        printf 'export DOCKER_HOST=%q\n' "$DOCKER_HOST"
    else
        printf 'export DOCKER_HOST=%q\n' "$OUR_HOST"
    fi
}

case "${1:-start}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command: $1 (start|stop|status|env)" ;;
esac
