#!/usr/bin/env bash
# Download the wheels the GPU check needs on a bare CUDA machine (Python 3.12, manylinux x86_64, no network) into
# DIR, slim the bitsandbytes wheel to its CUDA 13 and CPU libraries, check every wheel's Requires-Dist against the
# other wheels and the GPU image's packages (scripts/gpu/image.txt), and print the total size with the project tree.
#
#   scripts/gpu/wheelhouse.sh .whl          # run here, where PyPI is reachable; .whl/ is git-ignored
#
# The wheels are the pins of scripts/gpu/wheels.txt (constraints.txt's versions). bitsandbytes 0.50.2 holds one
# native library per CUDA/ROCm/XPU version (41 MiB); the GPU image's torch is 2.11+cu130, for which bitsandbytes
# loads libbitsandbytes_cuda130.so (the nearest CUDA 13 one otherwise): wheels.py keeps cuda130, cuda132 and cpu,
# and rewrites the RECORD to match. Exit code 1 if a wheel is missing, a requirement is unmet, or the total passes
# 60 MiB (the GPU machine takes at most 64 MiB of tree and wheels).
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
dir="$1"
python="${PYTHON:-python3}"
mkdir -p "$dir"
# a re-run keeps wheels already there; one of another version than the pin would be two of one name: start over
"$python" - "$dir" "$here/wheels.txt" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, str(Path(sys.argv[2]).parent))
from wheels import metadata, pins
wanted = pins(Path(sys.argv[2]))
for wheel in Path(sys.argv[1]).glob("*.whl"):
    m = metadata(wheel)
    if wanted.get(m["name"]) != m["version"]:
        print(f"removing {wheel.name} (not pinned in wheels.txt)")
        wheel.unlink()
EOF
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dir" -r "$here/wheels.txt"
"$python" "$here/wheels.py" slim-bnb "$dir"
"$python" "$here/wheels.py" check "$dir"
