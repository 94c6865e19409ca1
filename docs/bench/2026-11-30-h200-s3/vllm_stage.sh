#!/usr/bin/env bash
# vLLM 0.26.0 onto the GPU machine for `python -m nanoserve bench ... --compare vllm`, in chunks
# small enough for the device tool: a call carries at most 64 MiB *including* the working tree
# (34 MB here, mostly the embedded model), so ../shared/tools/vllm-on-device.sh's 59 MiB chunks
# do not fit and ../shared is not copied to the machine. This is that recipe with 28 MiB chunks.
#
#   here (package access; ~5 min):   bash docs/bench/2026-11-30-h200-s3/vllm_stage.sh host
#                                    -> .stage/vllm2/c1 .. c8 (ignored by git)
#   on the GPU machine, back to back (each a `run` call with carry [".stage/vllm2/cN"]; files under
#   /tmp/stage last only while that machine stays warm, ~30 s between calls):
#       bash docs/bench/2026-11-30-h200-s3/vllm_stage.sh append cN        (N = 1 .. 8)
#       bash docs/bench/2026-11-30-h200-s3/vllm_stage.sh install          # -> /tmp/vsite, /tmp/vdeps
#   then: PYTHONPATH=$PWD:/tmp/vsite:/tmp/vdeps python3 -m nanoserve bench throughput --device cuda --compare vllm
set -euo pipefail
STAGE=${STAGE:-.stage/vllm2}   # STAGE=.stage/vllm: the recipe's own 4 chunks of 59 MiB, which fit a
                               # call whose working tree is small (the fourth session moved weights/
                               # out of it for the staging calls)
host() {   # needs ../shared/tools/vllm-on-device.sh host to have made /tmp/vllm.tar.xz and .stage/vllm/c*/deps
  [ -f /tmp/vllm.tar.xz ] || bash ../shared/tools/vllm-on-device.sh host
  rm -rf $STAGE /tmp/vparts.* && mkdir -p $STAGE && split -b 28M -d -a 1 /tmp/vllm.tar.xz /tmp/vparts.
  local n=0
  for p in /tmp/vparts.?; do n=$((n+1)); mkdir -p $STAGE/c$n; mv "$p" "$STAGE/c$n/vllm.tar.xz.${p##*.}"; done
  n=$((n+1)); mkdir -p $STAGE/c$n/deps
  cp .stage/vllm/c*/deps/*.whl $STAGE/c$n/deps/ && (cd /tmp && sha256sum vllm.tar.xz) > $STAGE/c$n/vllm.tar.xz.sha256
  du -sh $STAGE/*
}
append() { mkdir -p /tmp/stage && cp -r $STAGE/$1/. /tmp/stage/ && du -sh /tmp/stage; }
install() {
  (cd /tmp/stage && cat vllm.tar.xz.? > /tmp/vllm.tar.xz) && (cd /tmp && sha256sum -c /tmp/stage/vllm.tar.xz.sha256)
  rm -rf /tmp/vsite /tmp/vdeps && mkdir -p /tmp/vsite
  if command -v xz >/dev/null; then xz -dc -T0 /tmp/vllm.tar.xz | tar -C /tmp/vsite -xf -
  else python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open('/tmp/vllm.tar.xz'), sys.stdout.buffer)" | tar -C /tmp/vsite -xf -; fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vdeps /tmp/stage/deps/*.whl
  PYTHONPATH=/tmp/vsite:/tmp/vdeps python3 -c "import vllm; print('import vllm', vllm.__version__)"
}
"$@"
