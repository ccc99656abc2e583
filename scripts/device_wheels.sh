#!/usr/bin/env bash
# Download, as wheels into .whl/ (git-ignored), every package that esm2_batch and
# scripts/device_check.py import and the lent GPU machine's image lacks: the pins in
# scripts/device_wheels.txt, for the image's CPython 3.12 on x86_64, as the device tool's
# README says (binary only, --no-deps, one version of each). Then it checks that no carried
# wheel needs a package that is neither in the image (scripts/device_image_packages.txt)
# nor carried.
#
#   bash scripts/device_wheels.sh                       # -> .whl/ for python 3.12
#   WHEELS_PYTHON=3.11 WHEELS_DIR=/tmp/w311 bash scripts/device_wheels.sh
#
# The device command that installs and uses them is in README's Performance section.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
version=${WHEELS_PYTHON:-3.12}
dir=${WHEELS_DIR:-.whl}

mkdir -p "$dir"
rm -f "$dir"/*.whl  # one version of each: two of one package stop the whole install
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 \
    -d "$dir" -r scripts/device_wheels.txt

"$python" - "$dir" <<'PY'
"""Every wheel's unconditional Requires-Dist must be in the image or carried."""
import re
import sys
import zipfile
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def names(path: str) -> set[str]:
    lines = Path(path).read_text().splitlines()
    return {canonical(re.split(r"[\s=<>!~;\[#]", line.strip(), maxsplit=1)[0])
            for line in lines if line.strip() and not line.lstrip().startswith("#")}


have = names("scripts/device_image_packages.txt") | names("scripts/device_wheels.txt")
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
if len(wheels) != len(names("scripts/device_wheels.txt")):
    sys.exit(f"expected one wheel per line of scripts/device_wheels.txt, got {len(wheels)}")
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        for line in archive.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                need = canonical(re.split(r"[\s=<>!~;\[(]", line.split(":", 1)[1].strip())[0])
                if need not in have:
                    missing.append(f"{wheel.name} needs {need}")
    print(f"{wheel.name}: {wheel.stat().st_size / 1e6:.2f} MB")
if missing:
    sys.exit("not in the image and not carried (add to scripts/device_wheels.txt): "
             + "; ".join(missing))
PY
