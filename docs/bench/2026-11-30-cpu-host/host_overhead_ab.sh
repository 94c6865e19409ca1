cd /tmp
for i in 1 2; do
  for side in before after; do
    if [ $side = before ]; then P=/tmp/before_s6; E=/tmp/torch_ext_before; else P=/work/main; E=/tmp/torch_ext_after; fi
    for mode in "bfloat16 none" "float32 int8"; do
      echo "== $side $mode (pass $i)"
      TORCH_EXTENSIONS_DIR=$E PYTHONPATH=$P /work/main/.venv/bin/python docs/bench/2026-11-30-cpu-host/host_overhead.py $mode 2>&1 | head -3
    done
  done
done
