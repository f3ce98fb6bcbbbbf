#!/usr/bin/env bash
# A local Milvus server for the tests and for trying `--vector-store`: the real Milvus standalone
# (embedded etcd, local storage) from PyPI's `milvus` package, in a venv of its own, listening on
# 127.0.0.1 at a free port.
#
#   tools/milvus.sh start     install if needed, start, wait until it answers, print its URL
#   tools/milvus.sh stop      stop it (the data stays)
#   tools/milvus.sh restart   stop, then start on the same port with the same data
#   tools/milvus.sh status    print the URL if it runs, else exit 1
#   tools/milvus.sh url       the URL (milvus://127.0.0.1:PORT), for `--vector-store URL/COLLECTION`
#
# Everything lives under $RETRO_MILVUS_HOME (default: target/milvus): venv/, data/, port, pid,
# server.log.
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR="${RETRO_MILVUS_HOME:-$PWD/target/milvus}"
VERSION="${RETRO_MILVUS_VERSION:-2.3.5}"
VENV="$HOME_DIR/venv"
PID_FILE="$HOME_DIR/pid"
PORT_FILE="$HOME_DIR/port"
LOG="$HOME_DIR/server.log"
mkdir -p "$HOME_DIR"

install() {
  if [ -x "$VENV/bin/milvus-server" ]; then return; fi
  echo "installing milvus==$VERSION into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "milvus==$VERSION" >&2
}

running() {
  [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

bindable() {
  python3 -c 'import socket, sys; s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null
}

# The proxy port the server really took: the wrapper moves to the next free port when the one
# asked for cannot be bound yet.
config_port() {
  awk '/^proxy:/ {p = 1} p && /^  port:/ {print $2; exit}' "$HOME_DIR/data/configs/milvus.yaml" 2>/dev/null
}

answers() {
  python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.settimeout(1)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

url() { echo "milvus://127.0.0.1:$(cat "$PORT_FILE")"; }

start() {
  if running; then url; return; fi
  install
  local port
  if [ -f "$PORT_FILE" ] && ! answers "$(cat "$PORT_FILE")"; then
    # A restart keeps its port (and URL): wait until the old socket is released.
    port="$(cat "$PORT_FILE")"
    for _ in $(seq 1 60); do bindable "$port" && break; sleep 1; done
  else
    port="$(free_port)"
  fi
  echo "$port" >"$PORT_FILE"
  mkdir -p "$HOME_DIR/data"
  # Its own session, so that stop reaches the server processes the wrapper starts.
  setsid "$VENV/bin/milvus-server" --data "$HOME_DIR/data" --proxy-port "$port" \
    >"$LOG" 2>&1 </dev/null &
  echo $! >"$PID_FILE"
  for _ in $(seq 1 240); do
    if ! running; then
      echo "milvus-server exited; the last lines of $LOG:" >&2
      tail -20 "$LOG" >&2
      exit 1
    fi
    if grep -q "Welcome to use Milvus" "$LOG" 2>/dev/null; then
      local real
      real="$(config_port)"
      if [ -n "$real" ] && answers "$real"; then
        echo "$real" >"$PORT_FILE"
        url
        return
      fi
    fi
    sleep 1
  done
  echo "milvus-server did not answer on 127.0.0.1:$port within 240 s; see $LOG" >&2
  exit 1
}

stop() {
  if ! running; then return; fi
  local pid
  pid="$(cat "$PID_FILE")"
  # The wrapper stops the server on SIGINT; the whole session goes if it does not.
  kill -INT "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  # The server's own processes in the session, if the wrapper left any.
  pkill -KILL -s "$pid" 2>/dev/null || true
  rm -f "$PID_FILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) if running; then url; else exit 1; fi ;;
  url) url ;;
  *) echo "usage: $0 start|stop|restart|status|url" >&2; exit 2 ;;
esac
