#!/usr/bin/env bash
# Both sides of the benchmark back to back, then the comparison table (bench/README.md).
#
#   bench/run.sh                                  # all workloads, workloads.json's steps
#   bench/run.sh --steps 5 --warmup 2 --only score,generate_b1 --threads 1
#
# The flags (--steps, --warmup, --only, --threads) go to both sides. Environment:
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

echo "== PyTorch + transformers + TRL ($(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg))"
HF_HUB_OFFLINE=1 "$PYTHON" bench/reference.py --model-dir bench/model --out bench/.cache/pytorch.json "$@"
echo
echo "== Resonance, backend $BACKEND ($(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg))"
"${resonance[@]}" bench --backend "$BACKEND" --out bench/.cache/resonance.json \
    --compare bench/.cache/pytorch.json "$@"
