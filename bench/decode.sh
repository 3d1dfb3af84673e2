#!/usr/bin/env bash
# Shardline's decode bench and the PyTorch layer (eager and torch.compile) in one go, then one table.
# Env: PRESET (mixtral-mini), DTYPES ("f32 bf16"), MODES ("eager compile"), DEVICE (cpu), LAYERS (1),
#      KV_LEN (128), THREADS (torch threads, default all cores), SHARDLINE_ARGS, PEER_ARGS, OUT.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
PRESET=${PRESET:-mixtral-mini}
DEVICE=${DEVICE:-cpu}
LAYERS=${LAYERS:-1}
KV_LEN=${KV_LEN:-128}
rm -f "$OUT"/decode-*.jsonl
for dtype in ${DTYPES:-f32 bf16}; do
    # One file per dtype for Shardline; run_shardline names it decode-shardline.jsonl, so move it aside.
    # shellcheck disable=SC2086
    run_shardline decode --preset "$PRESET" --dtype "$dtype" --device "$DEVICE" --layers "$LAYERS" \
        --kv-len "$KV_LEN" ${SHARDLINE_ARGS:-}
    if [[ -f "$OUT/decode-shardline.jsonl" ]]; then
        mv "$OUT/decode-shardline.jsonl" "$OUT/decode-shardline-$dtype.jsonl"
    fi
    for mode in ${MODES:-eager compile}; do
        echo "== torch_decode.py $PRESET $dtype $mode" >&2
        # shellcheck disable=SC2086
        "$PY" bench/peers/torch_decode.py --preset "$PRESET" --dtype "$dtype" --device "$DEVICE" \
            --layers "$LAYERS" --kv-len "$KV_LEN" --mode "$mode" --threads "${THREADS:-$(nproc)}" \
            ${PEER_ARGS:-} --json "$OUT/decode-torch-$dtype-$mode.jsonl"
    done
done
compare decode
