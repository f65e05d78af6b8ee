#!/usr/bin/env bash
# The GPU check of sezm, one script for one CUDA machine (about 8 minutes on one H200):
# CUDA parity on tests/data/parity, Triton rotations against dense, the neighbour search on the
# device against the host one, evaluation throughput and memory, DPA4-Mini training step times
# (eager, use_amp, use_compile), and `sezm freeze --device cuda` of tiny with the PyTorch and
# with the Triton rotations (DP_TRITON_INFER=1), each reloaded and compared with eager.
#
#   bash benchmarks/gpu/check.sh                 # on the GPU machine, from any directory
#   bash benchmarks/gpu/check.sh --cpu-dry-run   # the same sections on the CPU, tiny sizes
#   bash benchmarks/gpu/check.sh --upstream-site DIR   # also DeePMD-kit 3.2 side by side
#                                                      # (DIR made by upstream_site.sh)
#   SEZM_GPU_BUDGET=520 bash benchmarks/gpu/check.sh   # seconds for the sections (default 420)
#
# Uses the machine's python3 (PYTHON=... to choose another). Python packages it lacks among
# sezm's light dependencies (vesin, vesin-torch, dargs + typeguard, ase) are installed from the
# wheels carried in benchmarks/gpu/wheels into a temporary folder: no network is needed.
# The summary goes to $OUT/gpu_summary.md when $OUT is set, else benchmarks/gpu/summary.md.
set -uo pipefail
args=()
while (($#)); do
    if [[ "$1" == --upstream-site ]]; then
        export SEZM_UPSTREAM_SITE="$(cd "${2:?--upstream-site needs a folder}" && pwd)"
        shift 2
    else
        args+=("$1")
        shift
    fi
done
budget="${SEZM_GPU_BUDGET:-420}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${PYTHON:-python3}"
site="$(mktemp -d "${TMPDIR:-/tmp}/sezm-gpu-site.XXXXXX")"
trap 'rm -rf "$site"' EXIT

missing=()
for pair in vesin:vesin vesin_torch:vesin_torch dargs:dargs typeguard:typeguard ase:ase; do
    module="${pair%%:*}"; wheel="${pair##*:}"
    if ! "$py" -c "import $module" 2>/dev/null; then
        missing+=("$here"/wheels/"$wheel"-*.whl)
    fi
done
if ((${#missing[@]})); then
    echo "installing carried wheels: ${missing[*]##*/}"
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${missing[@]}" || exit 1
fi
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$py" -c "from scipy.integrate import lebedev_rule" 2>/dev/null \
    || echo "warning: scipy lacks lebedev_rule (scipy >= 1.15 needed by sezm's grid layers)"
exec timeout $((budget + 50)) "$py" "$here/gpu_check.py" --budget "$budget" ${args[@]+"${args[@]}"}
