#!/usr/bin/env bash
# weftnet data-plane demo (root): three nodes in network namespaces on one LAN, a signaling server,
# one pod per node; all pods ping each other and iperf3 runs between two of them, over the WebRTC mesh.
#
#   sudo examples/netns-demo.sh [--once]      (npm run build first; --once: exit after the checks)
#   examples/netns-demo.sh --check            (only check the tools it needs; exit 1 with the install line)
#
# Lab-only addresses: LAN 10.77.250.0/24 inside namespaces, pods 10.40.0.0/16. Nothing is routed to
# the real network. Ctrl-C (or the end, with --once) stops every process and deletes every namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
CLI="$PWD/dist/agent/cli/main.js"
# The tools this demo runs, and their Debian packages (iperf3 is optional: the throughput run is skipped).
missing=()
for tp in ip:iproute2 bridge:iproute2 nsenter:util-linux setpriv:util-linux iptables:iptables ping:iputils-ping; do
  command -v "${tp%%:*}" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "${tp%%:*}" >/dev/null 2>&1 || missing+=("${tp#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  pkgs=""
  for p in "${missing[@]}"; do case " $pkgs " in *" $p "*) ;; *) pkgs="${pkgs:+$pkgs }$p" ;; esac; done
  echo "netns-demo: missing tools; install them with: apt-get install -y $pkgs" >&2
  command -v iperf3 >/dev/null 2>&1 || echo "netns-demo: (iperf3 too, for the throughput run: apt-get install -y iperf3)" >&2
  exit 1
fi
if [ "${1:-}" = "--check" ]; then
  command -v iperf3 >/dev/null 2>&1 || echo "netns-demo: iperf3 is not installed (apt-get install -y iperf3): the throughput run will be skipped"
  exit 0
fi
[ -f "$CLI" ] || { echo "run npm run build first" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, TUN devices)" >&2; exit 1; }
ONCE=0; [ "${1:-}" = "--once" ] && ONCE=1
ID="wd$$"
LAN="$ID-lan"
ROOT="$(mktemp -d /tmp/weftnet-netns-demo.XXXXXX)"
TOKEN="demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
NODES=(n1 n2 n3)
PIDS=()

if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi   # no escape codes into files
say() { printf '%s==>%s %s\n' "$BOLD" "$PLAIN" "$*"; }
in_ns() { local ns="$1"; shift; nsenter --net="/run/netns/$ns" -- "$@"; }

cleanup() {
  set +e
  say "cleaning up"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  for n in "${NODES[@]}"; do ip netns del "$ID-pod-$n" 2>/dev/null; ip netns del "$ID-$n" 2>/dev/null; done
  ip netns del "$LAN" 2>/dev/null
  rm -rf "$ROOT"
}
trap cleanup EXIT
[ -n "${WEFTNET_DEMO_DEBUG:-}" ] && set -x
trap 'exit 130' INT TERM

say "building the LAN: namespace $LAN with a bridge, 10.77.250.1 runs the signaling server"
ip netns add "$LAN"
ip -n "$LAN" link set lo up
ip -n "$LAN" link add lan type bridge
ip -n "$LAN" addr add 10.77.250.1/24 dev lan
ip -n "$LAN" link set lan up
i=10
for n in "${NODES[@]}"; do
  i=$((i + 1))
  ip netns add "$ID-$n"
  ip -n "$ID-$n" link set lo up
  ip -n "$ID-$n" link add uplink type veth peer name "p-$n" netns "$LAN"
  ip -n "$LAN" link set "p-$n" master lan up
  ip -n "$ID-$n" addr add "10.77.250.$i/24" dev uplink
  ip -n "$ID-$n" link set uplink up
done

say "starting the signaling server"
setpriv --pdeathsig TERM nsenter --net="/run/netns/$LAN" -- node "$CLI" signal --listen 10.77.250.1:7000 --stun-port 3478 --token "$TOKEN" >"$ROOT/signal.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do in_ns "$LAN" bash -c 'exec 3<>/dev/tcp/10.77.250.1/7000' 2>/dev/null && break; sleep 0.1; done

for n in "${NODES[@]}"; do
  say "starting agent $n (TUN weft0, bridge weft-br0 in namespace $ID-$n)"
  setpriv --pdeathsig TERM nsenter --net="/run/netns/$ID-$n" -- node "$CLI" agent --signal ws://10.77.250.1:7000 --token "$TOKEN" \
    --name "$n" --state-dir "$ROOT/$n" >"$ROOT/$n.log" 2>&1 &
  PIDS+=($!)
done

say "waiting for the full mesh"
for _ in $(seq 150); do
  ok=1
  for n in "${NODES[@]}"; do
    c=$(node "$CLI" status --json --state-dir "$ROOT/$n" 2>/dev/null | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{try{console.log(JSON.parse(s).peers.filter(p=>p.state==="connected").length)}catch{console.log(0)}})' || true)
    [ "$c" = 2 ] || ok=0
  done
  [ $ok = 1 ] && break
  sleep 0.2
done
node "$CLI" status --state-dir "$ROOT/n1"

declare -A IP
for n in "${NODES[@]}"; do
  IP[$n]=$(in_ns "$ID-$n" node "$CLI" pod add "$ID-pod-$n" --state-dir "$ROOT/$n")
  say "pod $ID-pod-$n on $n: ${IP[$n]}"
done

for a in "${NODES[@]}"; do
  for b in "${NODES[@]}"; do
    [ "$a" = "$b" ] && continue
    say "ping from the pod on $a to the pod on $b (${IP[$b]})"
    for _ in $(seq 20); do ip netns exec "$ID-pod-$a" ping -c 1 -W 1 "${IP[$b]}" >/dev/null 2>&1 && break; sleep 0.25; done
    ip netns exec "$ID-pod-$a" ping -c 3 -i 0.2 "${IP[$b]}" | tail -2
  done
done

if command -v iperf3 >/dev/null; then
  say "iperf3 from the pod on n1 to the pod on n2 (5 s)"
  ip netns exec "$ID-pod-n2" iperf3 -s -1 -B "${IP[n2]}" >/dev/null 2>&1 &
  SP=$!
  sleep 0.5
  ip netns exec "$ID-pod-n1" iperf3 -c "${IP[n2]}" -t 5 | tail -4
  wait "$SP" 2>/dev/null || true
else
  say "iperf3 not installed (apt-get install iperf3): skipping the throughput run"
fi

say "routes on n1:"
node "$CLI" status routes --state-dir "$ROOT/n1"
if [ $ONCE = 1 ]; then exit 0; fi
say "running; press Ctrl-C to stop and clean up (logs in $ROOT)"
while true; do sleep 3600; done
