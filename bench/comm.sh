#!/usr/bin/env bash
# Shardline's comm bench, torch.distributed/gloo and (when mpicc exists) OpenMPI with its default
# transports and with UCX, in one go, then one table. Records match on transport too: rerun
# `python3 bench/peers/compare.py --ignore transport FILES` to line up e.g. shm against another name.
# Env: RANKS (2), SHARDLINE_ARGS, GLOO_ARGS, MPI_ARGS (extra flags for each), OUT.
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
    echo "== OpenMPI with --mca pml ucx" >&2
    # shellcheck disable=SC2086
    "${mpi[@]}" --mca pml ucx "$OUT/mpi_comm" ${MPI_ARGS:-} --json "$OUT/comm-openmpi-ucx.jsonl"
    # The program cannot tell which PML runs it; this run's records are UCX's whatever they say.
    "$PY" - "$OUT/comm-openmpi-ucx.jsonl" <<'PYEOF'
import json, sys
path = sys.argv[1]
recs = [json.loads(line) for line in open(path) if line.strip()]
with open(path, "w") as f:
    for r in recs:
        f.write(json.dumps({**r, "peer": "openmpi-ucx"}) + "\n")
PYEOF
fi
compare comm
