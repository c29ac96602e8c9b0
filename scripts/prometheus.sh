#!/usr/bin/env bash
# A real Prometheus for the tests: Debian's `prometheus` package (installed here when missing),
# listening on a free loopback port, scraping one target's /metrics every second, its data in
# WORK/data. Used by scripts/test-prometheus.sh and by the vLLM test (profilemate-vllm/tests).
#   bash scripts/prometheus.sh install               installs the package when missing
#   bash scripts/prometheus.sh start WORK TARGET [JOB]
#       starts it in the background (pid in WORK/prometheus.pid, log in WORK/prometheus.log),
#       waits until it is ready, and prints the port it listens on
#   bash scripts/prometheus.sh stop WORK             stops it and waits until it has exited
set -euo pipefail

install() {
  if ! command -v prometheus >/dev/null 2>&1; then
    echo "prometheus.sh: installing Debian's prometheus package" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >&2
  fi
  prometheus --version 2>&1 | head -n 1 >&2
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {
  local work="$1" target="$2" job="${3:-target}"
  install
  mkdir -p "$work"
  local port
  port="$(free_port)"
  cat >"$work/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
scrape_configs:
  - job_name: $job
    static_configs:
      - targets: ["$target"]
YML
  nohup prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
    --web.listen-address="127.0.0.1:$port" --log.level=warn </dev/null >"$work/prometheus.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$work/prometheus.pid"
  ready() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "http://127.0.0.1:$port/-/ready" >/dev/null 2>&1; }
  for _ in $(seq 1 120); do
    ready && { echo "$port"; return 0; }
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  cat "$work/prometheus.log" >&2
  echo "prometheus.sh: prometheus did not become ready on 127.0.0.1:$port" >&2
  stop "$work"
  return 1
}

stop() {
  local work="$1" pid
  [ -f "$work/prometheus.pid" ] || return 0
  pid="$(cat "$work/prometheus.pid")"
  rm -f "$work/prometheus.pid"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.25
  done
  kill -9 "$pid" 2>/dev/null || true
}

case "${1:-}" in
  install) install ;;
  start) [ $# -ge 3 ] || { echo "usage: $0 start WORK TARGET [JOB]" >&2; exit 2; }; start "$2" "$3" "${4:-}" ;;
  stop) [ $# -ge 2 ] || { echo "usage: $0 stop WORK" >&2; exit 2; }; stop "$2" ;;
  *) echo "usage: $0 install | start WORK TARGET [JOB] | stop WORK" >&2; exit 2 ;;
esac
