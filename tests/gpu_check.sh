#!/usr/bin/env bash
# The GPU check (tests/gpu_check.py) on a machine that has torch, numpy, pillow and regex and no
# package registry: installs the wheels that tests/gpu_wheels.sh prepared into a temporary folder
# on PYTHONPATH (nothing else on the machine changes), then runs the check.
#
#     bash tests/gpu_check.sh OUT_DIR              # one CUDA GPU, about 7 minutes (--budget 450 s)
#     bash tests/gpu_check.sh --dry-run OUT_DIR    # every part on CPU, tiny settings
#
# OUT_DIR receives gpu_check.json, gpu_check.md and logs.tar.gz, rewritten after every row.
# $GPU_WHEELS names the wheel folder (default .whl), $PYTHON the interpreter (default python3);
# further options go to gpu_check.py (--budget SECONDS, --workers N, --work DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.whl}
[[ $# -ge 1 ]] || { echo "usage: bash tests/gpu_check.sh [--dry-run] OUT_DIR [gpu_check.py options]" >&2; exit 2; }
ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1 || {
  echo "no wheels in $WHEELS: run 'bash tests/gpu_wheels.sh <python version>' where pip reaches the registry" >&2; exit 2; }

started=$(date +%s)
site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
trap 'rm -rf "$site"' EXIT
# Every distribution in the folder, by name: pip picks the wheel of this Python among those there
names=$(ls "$WHEELS" | grep '\.whl$' | cut -d- -f1 | sort -u)
$PY -m pip install -q --no-index --no-deps --no-cache-dir --disable-pip-version-check \
  --find-links "$WHEELS" --target "$site" $names
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import deepspeed, ftfy, pydantic" || { echo "the wheels in $WHEELS do not import with $($PY -V)" >&2; exit 2; }
echo "installed $(echo $names | wc -w) packages from $WHEELS in $(( $(date +%s) - started )) s ($($PY -V))"

if [[ $1 == --dry-run ]]; then
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
fi
exec $PY tests/gpu_check.py "$@"
