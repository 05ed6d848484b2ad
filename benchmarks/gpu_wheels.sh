#!/usr/bin/env bash
# Wheels that the GPU machine's image lacks (PyAV, pydantic and its companions), for its Python 3.12 on x86-64,
# into .whl/ (ignored by git): the device tool carries them with `carry: [".whl"]` (about 40 MB of its 64).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl av pydantic
ls .whl
