#!/usr/bin/env bash
# Run benchmarks/gpu.py on a GPU machine within a wall-clock budget, with the peers' wheels.
#
#   bash benchmarks/gpu_setup.sh [BUDGET_SECONDS [gpu.py arguments...]]
#
# 1. installs every wheel in .whl/ (git-ignored; carry it to the machine) into $SITE with
#    --no-deps --no-index: nothing is fetched, and the machine's own torch / triton stay;
# 2. runs gpu.py with --budget BUDGET - 90 (no cell starts after that) under `timeout BUDGET`;
#    on the TERM signal gpu.py still writes the rows it has. The table goes to
#    benchmarks/results/gpu-<card>-<date>.md (or --out), and to $OUT when OUT is set.
#
# Fill .whl/ where pip reaches PyPI (versions as in docs/guides/gpu.md):
#   python -m pip download --no-deps -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1 quack-kernels==0.6.5
# quack also needs nvidia-cutlass-dsl (+ -libs-base, -libs-cu13: the last is a 92 MB wheel, over
# what one call of the device tool carries), apache-tvm-ffi and torch-c-dlpack-ext; without them its
# rows say "not installed".
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-540}
[ $# -gt 0 ] && shift
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    # one wheel at a time: pip refuses a whole list for one wheel this Python cannot take
    for w in .whl/*.whl; do
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$w" \
            || echo "gpu_setup: $w did not install; its rows will say so" >&2
    done
else
    echo "gpu_setup: no wheels in .whl/: the peers' rows will say 'not installed'" >&2
fi
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; print(torch.cuda.get_device_name(), torch.__version__)" || exit 2
CELLS=$((BUDGET > 180 ? BUDGET - 90 : BUDGET / 2))
timeout --signal=TERM --kill-after=20 "$BUDGET" "$PY" benchmarks/gpu.py --budget "$CELLS" "$@"
