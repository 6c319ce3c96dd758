#!/usr/bin/env bash
# Emulate two nodes on one machine for bench_train.py (root, Linux, iproute2).
#   topology.sh up [MBIT]   namespaces semoe_n0 (10.77.0.1) and semoe_n1 (10.77.0.2), joined by a veth pair
#                           whose both ends are rate-limited to MBIT Mbit/s with a tc token bucket (default 1000)
#   topology.sh down        remove them
# Traffic between ranks inside one namespace stays on that namespace's loopback (unlimited); traffic
# between the namespaces crosses the limited link. Nothing outside these namespaces is touched.
set -euo pipefail
cmd=${1:-}
rate=${2:-1000}
down() {
  ip netns del semoe_n0 2>/dev/null || true
  ip netns del semoe_n1 2>/dev/null || true
}
case "$cmd" in
  up)
    [ "$(id -u)" = 0 ] || { echo "topology.sh: needs root (network namespaces and tc)" >&2; exit 2; }
    down
    ip netns add semoe_n0
    ip netns add semoe_n1
    ip link add semoe_v0 type veth peer name semoe_v1
    ip link set semoe_v0 netns semoe_n0
    ip link set semoe_v1 netns semoe_n1
    for n in 0 1; do
      ip -n semoe_n$n addr add 10.77.0.$((n + 1))/24 dev semoe_v$n
      ip -n semoe_n$n link set lo up
      ip -n semoe_n$n link set semoe_v$n up
      ip netns exec semoe_n$n tc qdisc add dev semoe_v$n root tbf rate "${rate}mbit" burst 256kb latency 100ms
    done
    echo "two emulated nodes up: 10.77.0.1 <-> 10.77.0.2 at ${rate} Mbit/s"
    ;;
  down) down ;;
  *) echo "usage: topology.sh up [MBIT] | down" >&2; exit 2 ;;
esac
