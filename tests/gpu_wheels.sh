#!/usr/bin/env bash
# Wheels for tests/gpu_check.sh on a machine that has torch, numpy, pillow and regex but no package
# registry (the lent GPU machine: Python 3.12, torch 2.11 + CUDA 13): every other package the check
# imports, for one Python version, x86-64 Linux. Run it here, where pip reaches the registry:
#
#     bash tests/gpu_wheels.sh 3.12            # into .whl/ (git-ignored), for the GPU machine
#     bash tests/gpu_wheels.sh 3.11 /tmp/whl   # this machine's Python, for gpu_check.sh --dry-run
#
# DeepSpeed has no wheel on the index: one is built from its source release (pure Python, no ops
# compiled; it compiles what it needs at run time, and this trainer needs none). Its requirements are
# read from the built wheel's METADATA and checked against the list below, so a new DeepSpeed that
# needs another package fails here, not on the GPU machine. A folder holds one version of each
# package; the wheels of another Python version already there are left alone (pip picks by tag).
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=${1:?usage: bash tests/gpu_wheels.sh PYTHON_VERSION [DEST], e.g. 3.12}
DEST=${2:-.whl}
[[ $PYVER =~ ^3\.[0-9]+$ ]] || { echo "PYTHON_VERSION must look like 3.12, got '$PYVER'" >&2; exit 2; }
PY=${PYTHON:-python3}

# The versions CI tests with (requirements.txt: DeepSpeed 0.19.7 and 0.19.8 tested), pinned so that
# the GPU machine runs what the CPU tests ran.
DEEPSPEED=0.19.8
# DeepSpeed 0.19.8's Requires-Dist less torch and numpy (on the machine), all of them: it imports
# some only on paths a CPU dry run does not take (the CUDA accelerator, op builders), and the GPU
# machine gets one try; msclip.py's ftfy; pydantic's and ftfy's own requirements. psutil is also
# distributed.launcher_processes', tqdm eval.py's.
PACKAGES=(
  einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 packaging==26.2 psutil==7.2.2 py-cpuinfo==9.0.0
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-extensions==4.15.0 typing-inspection==0.4.2
  tqdm==4.70.1 ftfy==6.3.1 wcwidth==0.7.0
)
IMAGE_HAS=(torch numpy pillow regex)

mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if ! ls "$DEST"/deepspeed-$DEEPSPEED-*.whl >/dev/null 2>&1; then
  echo "building deepspeed $DEEPSPEED (no wheel on the index)"
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-binary deepspeed -w "$tmp" "deepspeed==$DEEPSPEED"
  mv "$tmp"/deepspeed-*.whl "$DEST"/
fi

# DeepSpeed's own list: every requirement must be on the machine's image or in PACKAGES
wheel=$(ls "$DEST"/deepspeed-$DEEPSPEED-*.whl)
requires=$(unzip -p "$wheel" '*/METADATA' | grep '^Requires-Dist:' | grep -v 'extra *==' |
           sed 's/^Requires-Dist: *\([A-Za-z0-9_.-]*\).*/\1/')
normal() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
for name in $requires; do
  n=$(normal "$name")
  found=no
  for have in "${IMAGE_HAS[@]}" "${PACKAGES[@]%%==*}"; do [[ $(normal "$have") == "$n" ]] && found=yes; done
  [[ $found == yes ]] || { echo "deepspeed $DEEPSPEED requires '$name', which gpu_wheels.sh does not bring" >&2; exit 1; }
done

# Binary wheels for that Python and x86-64 Linux (pip matches manylinux_2_N exactly: several N)
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 \
           manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d "$DEST" "${PACKAGES[@]}"

# One version of each package (a leftover of another version would stop `pip install *.whl`)
$PY - "$DEST" <<'EOF'
import collections, os, re, sys
versions = collections.defaultdict(set)
for name in os.listdir(sys.argv[1]):
    if name.endswith(".whl"):
        dist, version = name.split("-")[:2]
        versions[re.sub(r"[-_.]+", "-", dist).lower()].add(version)
twice = {d: sorted(v) for d, v in versions.items() if len(v) > 1}
if twice:
    sys.exit(f"{sys.argv[1]} holds several versions of {twice}: remove the old wheels")
EOF

echo "$DEST: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1); Python $PYVER's:"
ls "$DEST" | grep -E "cp${PYVER/./}|py3|py2.py3|abi3" | sed 's/^/  /'
