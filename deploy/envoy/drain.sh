#!/bin/bash
# Envoy's preStop (run by the kubelet before SIGTERM, which makes Envoy exit at once): start a
# graceful drain of the listeners (HTTP/2 GOAWAY: clients reconnect to another Envoy replica,
# open streams continue), then wait while conversations still run through this replica: open
# Converse streams (cluster orchestrator) and STT streams (cluster stt, one per session), at most
# DRAIN_MAX_SECONDS. Only bash built-ins and the admin port on loopback: the image has no curl.
# ENVOY_ADMIN_PORT and DRAIN_CLUSTERS (a regex of cluster names) let the tls component's second
# Envoy use it too.
set -u
max=${DRAIN_MAX_SECONDS:-600}
port=${ENVOY_ADMIN_PORT:-9901}
clusters=${DRAIN_CLUSTERS:-orchestrator|stt}
settle=${DRAIN_SETTLE_SECONDS:-5}  # before the first look: the drain's GOAWAYs go out
poll=${DRAIN_POLL_SECONDS:-2}
admin() {  # METHOD PATH: the admin's answer on stdout
  exec 3<>/dev/tcp/127.0.0.1/$port || return 1
  printf '%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$1" "$2" >&3
  while IFS= read -r line <&3; do printf '%s\n' "$line"; done
  exec 3<&-
}
admin POST '/drain_listeners?graceful' >/dev/null
re="^cluster\\.($clusters)\\.upstream_rq_active: ([0-9]+)"
start=$SECONDS
sleep "$settle"
while (( SECONDS - start < max )); do
  open=0
  while IFS= read -r line; do
    [[ $line =~ $re ]] && open=$(( open + BASH_REMATCH[2] ))
  done < <(admin GET '/stats?filter=upstream_rq_active')
  (( open == 0 )) && break
  sleep "$poll"
done
if (( open > 0 )); then
  echo "drain: $open streams still open after ${max} s; stopping anyway" >&2
else
  echo "drain: no streams open; stopping" >&2
fi
