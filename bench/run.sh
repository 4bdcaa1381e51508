#!/usr/bin/env bash
# Both sides of the benchmark back to back, then the comparison table (bench/README.md).
#
#   bench/run.sh                                  # all workloads, workloads.json's steps
#   bench/run.sh --steps 5 --warmup 2 --only score,generate_b1 --threads 1
#   bench/run.sh --interleave                     # PyTorch then Resonance per workload
#
# The flags (--steps, --warmup, --only, --threads) go to both sides. --interleave runs the two
# sides workload by workload (each pair minutes apart instead of one whole side apart, which
# matters on a machine whose speed drifts) and merges the per-workload results before comparing.
# Environment:
#   PYTHON       the interpreter with bench/requirements.txt (default: /root/.cache/venv-ref/bin/python
#                when it exists, else python3)
#   RESONANCE    a built `resonance` binary (default: `cargo run -p resonance-cli $CARGO_FLAGS --`)
#   CARGO_FLAGS  default "--release" (a dev build is ~2x slower); e.g. "--release --features cuda"
#   BACKEND      cpu (default), wgpu, cuda, ndarray: the Resonance backend
# The PyTorch side writes the weights on first use (bench/.cache/model) and always runs on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x /root/.cache/venv-ref/bin/python ]]; then PYTHON=/root/.cache/venv-ref/bin/python; else PYTHON=python3; fi
fi
BACKEND=${BACKEND:-cpu}
if [[ -n "${RESONANCE:-}" ]]; then
    resonance=("$RESONANCE")
else
    # shellcheck disable=SC2086
    cargo build -q -p resonance-cli ${CARGO_FLAGS---release}
    # shellcheck disable=SC2086
    resonance=(cargo run -q -p resonance-cli ${CARGO_FLAGS---release} --)
fi

run_pytorch() { # out, flags...
    local out=$1
    shift
    echo "== PyTorch + transformers + TRL ($(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg))"
    HF_HUB_OFFLINE=1 "$PYTHON" bench/reference.py --model-dir bench/model --out "$out" "$@"
    echo
}

run_resonance() { # out, flags...
    local out=$1
    shift
    echo "== Resonance, backend $BACKEND ($(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg))"
    "${resonance[@]}" bench --backend "$BACKEND" --out "$out" "$@"
}

interleave=0
only=""
flags=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --interleave) interleave=1 ;;
        --only) only=$2; shift ;;
        --only=*) only=${1#--only=} ;;
        *) flags+=("$1") ;;
    esac
    shift
done

if [[ $interleave == 0 ]]; then
    only_flag=()
    [[ -n $only ]] && only_flag=(--only "$only")
    run_pytorch bench/.cache/pytorch.json "${flags[@]}" "${only_flag[@]}"
    run_resonance bench/.cache/resonance.json --compare bench/.cache/pytorch.json \
        "${flags[@]}" "${only_flag[@]}"
    exit 0
fi

if [[ -z $only ]]; then
    only=$("$PYTHON" -c 'import json; print(",".join(json.load(open("bench/workloads.json"))["workloads"]))')
fi
parts=bench/.cache/interleaved
rm -rf "$parts"
mkdir -p "$parts"
IFS=, read -r -a names <<< "$only"
for name in "${names[@]}"; do
    run_pytorch "$parts/pytorch-$name.json" "${flags[@]}" --only "$name"
    run_resonance "$parts/resonance-$name.json" "${flags[@]}" --only "$name"
    echo
done
# One file per side: the first part's header, every part's workload, each part's matmul peak.
"$PYTHON" - "$parts" "${names[@]}" <<'PY'
import json, sys
parts, names = sys.argv[1], sys.argv[2:]
for side in ("pytorch", "resonance"):
    merged = None
    for name in names:
        part = json.load(open(f"{parts}/{side}-{name}.json"))
        if merged is None:
            merged = dict(part, workloads={}, matmul_peak_per_workload={})
        merged["workloads"].update(part["workloads"])
        merged["matmul_peak_per_workload"][name] = part["matmul_peak"]
    merged["settings"]["interleaved"] = True
    json.dump(merged, open(f"bench/.cache/{side}.json", "w"), indent=1)
PY
"${resonance[@]}" bench --no-run --out bench/.cache/resonance.json --compare bench/.cache/pytorch.json
