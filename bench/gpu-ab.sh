#!/usr/bin/env bash
# A/B of GPU decode variants in one run: `bench decode --device cuda` for each preset and each
# variant, the variants alternating round by round (the machine drifts between calls, so only
# figures from one run are compared). A variant is "NAME|VAR=VALUE VAR=VALUE ..." (environment
# for the shardline process, e.g. "unroll8|SHARDLINE_NVRTC_OPTIONS=-DUNROLL=8"; "base|" for none;
# a ',' in a value stands for a space, as in SHARDLINE_NVRTC_OPTIONS=-DUNROLL=8,-DATTN_BATCH=2;
# BIN=PATH among them runs another shardline binary, such as a build of main).
#
# Knobs: PRESETS (default qwen3-30b-a3b,mixtral-8x7b,mixtral-mini), ROUNDS (default 2), EXEC
# (split), ITERS (200), BIN (the shardline binary; default $SHARDLINE_GPU_BIN/shardline or
# target/release/shardline), OUT (results folder, default gpu-results/).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$#" -gt 0 ] || { echo "usage: $0 'NAME|VAR=VALUE ...' ..." >&2; exit 2; }
# shellcheck source=scripts/gpu-env.sh
. scripts/gpu-env.sh
bin=${BIN:-${SHARDLINE_GPU_BIN:-target/release}/shardline}
out=${OUT:-gpu-results}
mkdir -p "$out"
log="$out/ab.jsonl"
: > "$log"
presets=${PRESETS:-qwen3-30b-a3b,mixtral-8x7b,mixtral-mini}
for round in $(seq "${ROUNDS:-2}"); do
    for p in ${presets//,/ }; do
        for variant in "$@"; do
            name=${variant%%|*}
            # shellcheck disable=SC2206  # the variable list is a word list
            vars=(${variant#*|})
            vars=("${vars[@]//,/ }")
            run_bin=$bin
            for v in "${vars[@]}"; do [ "${v%%=*}" = BIN ] && run_bin=${v#BIN=}; done
            rec=$(mktemp)
            env "${vars[@]}" "$run_bin" bench decode --device cuda --preset "$p" --dtype bf16 \
                --exec "${EXEC:-split}" --iters "${ITERS:-200}" --json "$rec" >/dev/null
            python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).readline()); r["variant"]=sys.argv[2]; r["round"]=int(sys.argv[3]); print(json.dumps(r))' \
                "$rec" "$name" "$round" >> "$log"
            rm -f "$rec"
        done
    done
done
python3 - "$log" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cases = {}
for r in rows:
    cases.setdefault((r["model"], r["variant"]), []).append(r["median_us"])
print(f"{'preset':<16} {'variant':<24} {'median us':>10}  rounds")
for (model, variant), v in cases.items():
    print(f"{model:<16} {variant:<24} {statistics.median(v):>10.1f}  " + " / ".join(f"{x:.1f}" for x in v))
PY
