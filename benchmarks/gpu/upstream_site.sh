#!/usr/bin/env bash
# Prepare DeePMD-kit 3.2.0 for the side-by-side section of the GPU check, as a folder to put on
# PYTHONPATH of a machine that has PyTorch 2.11 but no network (the GPU image):
#
#   bash benchmarks/gpu/upstream_site.sh .upstream     # here, with network; ~14 MB
#   bash benchmarks/gpu/check.sh --upstream-site .upstream   # there (carry .upstream)
#
# Only DeePMD-kit's Python code travels: its compiled libraries (TensorFlow ops, the LAMMPS
# plugin, the multi-rank communication op) are left out, which DPA4's single-process
# evaluation never calls, so neither MPI nor a matching CUDA runtime is needed. Its
# pure-Python needs that the image lacks (wcmatch, bracex, array-api-compat, lmdb) come as
# wheels for CPython 3.12. `mendeleev` (a large dependency tree) is replaced by a stub: DeePMD-kit
# only looks element numbers up in it to sort the element names of a message.
set -euo pipefail
dest="${1:?usage: upstream_site.sh DEST}"
python="${PYVER:-3.12}"
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
target=(--no-deps --only-binary=:all: --python-version "$python" --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q "${target[@]}" -d "$wheels" "deepmd-kit==3.2.0" "wcmatch==12.0.4" \
    "bracex==3.2.4" "array-api-compat==1.16.0" "lmdb==3.0.0"
rm -rf "$dest"
python3 -m pip install -q --no-index "${target[@]}" --no-compile --target "$dest" "$wheels"/*.whl
rm -rf "$dest/deepmd_kit.libs"
find "$dest/deepmd/lib" \( -name "*.so" -o -name dp_ipi \) -exec rm -rf {} +
# the wheel asks to preload MPI for its compiled libraries, which are gone
sed -i 's/^CIBUILDWHEEL = 1/CIBUILDWHEEL = 0/' "$dest/deepmd/lib/run_config.ini"
rm -rf "$dest/bin"
cat >"$dest/mendeleev.py" <<'EOF'
"""Stand-in for mendeleev in the GPU check's DeePMD-kit: element numbers are not looked up."""


def element(symbol):
    raise ValueError(symbol)
EOF
du -sh "$dest"
