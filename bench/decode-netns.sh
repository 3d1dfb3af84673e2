#!/usr/bin/env bash
# `shardline bench decode --tp 2` with its two ranks on two "hosts": network namespaces joined by
# a veth pair, talking over tcp: ranks started by hand as on several hosts (docs/architecture.md,
# "Bootstrap and launch"), on one machine. Needs root and iproute2. Runs split and per-op; rank
# 0's records go to $OUT/decode-netns.jsonl and the table.
# Env: PRESET (mixtral-mini), DTYPE (bf16), ITERS (300), DELAY (netem delay on each link, e.g.
#      1ms; empty: none; refused where the kernel has no netem), OUT.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
PRESET=${PRESET:-mixtral-mini}
DTYPE=${DTYPE:-bf16}
ITERS=${ITERS:-300}
cargo build --release -q -p shardline
bin=$PWD/target/release/shardline

ns=(slbench$$a slbench$$b)
veth=(slb$$a slb$$b)
cleanup() { for n in "${ns[@]}"; do ip netns del "$n" 2>/dev/null || true; done; }
trap cleanup EXIT
for n in "${ns[@]}"; do ip netns add "$n"; done
ip link add "${veth[0]}" type veth peer name "${veth[1]}"
for i in 0 1; do
    ip link set "${veth[$i]}" netns "${ns[$i]}"
    ip -n "${ns[$i]}" addr add "10.232.0.$((i + 1))/24" dev "${veth[$i]}"
    ip -n "${ns[$i]}" link set "${veth[$i]}" up
    ip -n "${ns[$i]}" link set lo up
    if [ -n "${DELAY:-}" ]; then
        ip netns exec "${ns[$i]}" tc qdisc add dev "${veth[$i]}" root netem delay "$DELAY" ||
            { echo "netem is not available in this kernel: no delay" >&2; DELAY=; }
    fi
done

: > "$OUT/decode-netns.jsonl"
for exec in split per-op; do
    echo "== bench decode --tp 2 --exec $exec over tcp between two namespaces" >&2
    token=$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
    common=(SHARDLINE_WORLD_SIZE=2 SHARDLINE_COORDINATOR=10.232.0.1:29517
        SHARDLINE_JOB_TOKEN="$token" SHARDLINE_TRANSPORT=tcp SHARDLINE_THREADS=1)
    args=(bench decode --preset "$PRESET" --dtype "$DTYPE" --tp 2 --exec "$exec" --iters "$ITERS")
    ip netns exec "${ns[1]}" env "${common[@]}" SHARDLINE_RANK=1 "$bin" "${args[@]}" &
    rank1=$!
    ip netns exec "${ns[0]}" env "${common[@]}" SHARDLINE_RANK=0 "$bin" "${args[@]}" \
        --json "$OUT/decode-netns-$exec.jsonl"
    wait "$rank1"
    cat "$OUT/decode-netns-$exec.jsonl" >> "$OUT/decode-netns.jsonl"
done
"$PY" bench/peers/compare.py "$OUT/decode-netns.jsonl"
