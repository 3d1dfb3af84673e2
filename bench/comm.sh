#!/usr/bin/env bash
# Shardline's comm bench, torch.distributed/gloo and (when mpicc exists) OpenMPI with its default
# transports and with UCX, in one go, then one table. Records match on transport too: rerun
# `python3 bench/peers/compare.py --ignore transport FILES` to line up e.g. shm against another name.
# Env: RANKS (2), SHARDLINE_ARGS, GLOO_ARGS, MPI_ARGS (extra flags for each), OUT.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
RANKS=${RANKS:-2}
rm -f "$OUT"/comm-*.jsonl
# shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
run_shardline comm --ranks "$RANKS" ${SHARDLINE_ARGS:-}
echo "== gloo_comm.py" >&2
# shellcheck disable=SC2086
"$PY" bench/peers/gloo_comm.py --ranks "$RANKS" ${GLOO_ARGS:-} --json "$OUT/comm-gloo.jsonl"

if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null; then
    echo "!! no mpicc/mpirun on this machine (Debian: apt-get install libopenmpi-dev openmpi-bin): OpenMPI skipped" >&2
elif [[ ! -f bench/peers/mpi_comm.c ]]; then
    echo "!! bench/peers/mpi_comm.c is not in this tree yet: OpenMPI skipped" >&2
else
    mpicc -O2 -o "$OUT/mpi_comm" bench/peers/mpi_comm.c
    mpi=(mpirun -np "$RANKS" --allow-run-as-root --oversubscribe)
    echo "== OpenMPI, default transports" >&2
    # shellcheck disable=SC2086
    "${mpi[@]}" "$OUT/mpi_comm" ${MPI_ARGS:-} --json "$OUT/comm-openmpi.jsonl"
    # OpenMPI's UCX PML takes only RDMA transports unless told otherwise; "any" lets it use UCX's
    # shared-memory and TCP transports too, so it runs (and is measured) on a host without RDMA.
    echo "== OpenMPI with --mca pml ucx" >&2
    # shellcheck disable=SC2086
    if "${mpi[@]}" --mca pml ucx --mca pml_ucx_tls any --mca pml_ucx_devices any \
        "$OUT/mpi_comm" ${MPI_ARGS:-} --json "$OUT/comm-openmpi-ucx.jsonl"; then
        # Label this run's records as UCX's whatever the program wrote.
        "$PY" - "$OUT/comm-openmpi-ucx.jsonl" <<'PYEOF'
import json, sys
path = sys.argv[1]
recs = [json.loads(line) for line in open(path) if line.strip()]
with open(path, "w") as f:
    for r in recs:
        f.write(json.dumps({**r, "peer": "openmpi-ucx"}) + "\n")
PYEOF
    else
        echo "!! OpenMPI with UCX failed (see above); the table leaves it out" >&2
        rm -f "$OUT/comm-openmpi-ucx.jsonl"
    fi
fi
compare comm
