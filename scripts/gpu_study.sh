#!/usr/bin/env bash
# GPU verification (make gpu-study): on one H100/H200 with nothing but this repository,
# measure the benchmark and run the whole reference study on the real archive, with its
# fast path.
#
#   ARCHIVE=path/to/cifar10-jpeg.tar.gz scripts/gpu_study.sh
#   STAGES=bench scripts/gpu_study.sh      # or STAGES=cache, STAGES=study: one part per command
#   EXTRA="data.train_subset=256 ..." ...  # overrides for every training run (smoke tests)
#
# Stages: 1. install kdlight next to the machine's torch (wheels from .whl/ when the
# machine is offline); 2. python -m kdlight.bench; 2b. its teacher-cache rows (the KD step
# and the grid live, filling and warm; a stage of its own, so that each fits one device
# command); 3. teacher (200 epochs) and student baseline (200 epochs) side by side on the
# one GPU, then the fused 12-cell T x alpha grid (200 epochs), then kdlight-report.
#
# The figures go to $OUT (default outputs/gpu_study), nine files at most: device.txt,
# bench.json, bench_cache.json, timings.txt, report.md, report.csv, groups.csv, heatmap.png
# and, if a stage fails, log_ends.txt. The data cache, the runs and the full logs go to $WORK (default $OUT/work).
set -Eeuo pipefail  # -E: the ERR trap below fires inside functions too
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_study}
WORK=${WORK:-$OUT/work}
ARCHIVE=${ARCHIVE:-../shared/data/cifar10-jpeg.tar.gz}
EPOCHS=${EPOCHS:-200}
STAGES=${STAGES:-bench cache study}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1

# 1. install: nothing but what is missing, never another torch
if ! $PYTHON -c "import hydra, lightning, torchmetrics" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PYTHON -m pip install -q --no-index --no-deps --target /tmp/kdlight-site .whl/*.whl
  else
    $PYTHON -m pip install -q --target /tmp/kdlight-site 'hydra-core>=1.3.2,<1.4' omegaconf
  fi
  export PYTHONPATH=/tmp/kdlight-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi: no GPU"; } | tee "$OUT/device.txt"

stamp() { echo "$1 $(date +%s)" >>"$OUT/timings.txt"; }
: >"$OUT/timings.txt"
exec 3>&1  # the script's own output, for the trap: it may fire where output goes to a log
trap 'trap - ERR; tail -n 5 "$WORK"/*.log >"$OUT/log_ends.txt"; { echo "gpu_study.sh failed; the ends of its logs:"; cat "$OUT/log_ends.txt"; } >&3' ERR

# 2. the benchmark
if [[ " $STAGES " == *" bench "* ]]; then
  stamp bench_start
  $PYTHON -m kdlight.bench --no-cache --out "$OUT/bench.json" 2>&1 | tee "$WORK/bench.log" | grep -v Warning
  stamp bench_end
fi
if [[ " $STAGES " == *" cache "* ]]; then
  stamp cache_start
  $PYTHON -m kdlight.bench --no-methods --no-zoo --no-overhead --out "$OUT/bench_cache.json" 2>&1 \
    | tee "$WORK/bench_cache.log" | grep -v Warning
  stamp cache_end
fi
[[ " $STAGES " == *" study "* ]] || exit 0

# 3. the reference study, fast path
# shellcheck disable=SC2086  # EXTRA is a list of overrides
train() { $PYTHON -m kdlight.train speed=fast data.archive_path="$ARCHIVE" data.data_dir="$WORK/data" \
  paths.root="$WORK/study" trainer.max_epochs="$EPOCHS" trainer.enable_progress_bar=false "~callbacks.progress_bar" $EXTRA "$@"; }
$PYTHON -c "from kdlight.data.sources import load_archive; load_archive('$ARCHIVE', '$WORK/data')"  # decode once
stamp study_start
(trap - ERR; train experiment=teacher) >"$WORK/teacher.log" 2>&1 &  # its failure shows at wait
teacher=$!
train experiment=student_baseline >"$WORK/baseline.log" 2>&1
wait $teacher
stamp teacher_and_baseline_end
train experiment=distill_grid "distill.temperature=[1,2,4,8]" "distill.alpha=[0.1,0.5,0.9]" >"$WORK/grid.log" 2>&1
stamp study_end
$PYTHON -m kdlight.report "$WORK/study" --out "$WORK/report" | tee "$WORK/report.log"
cp "$WORK"/report/{report.md,report.csv,groups.csv,heatmap.png} "$OUT/"
awk '{t[$1]=$2} END {printf "bench %ds, teacher+baseline %ds, grid %ds, study %ds\n", t["bench_end"]-t["bench_start"], t["teacher_and_baseline_end"]-t["study_start"], t["study_end"]-t["teacher_and_baseline_end"], t["study_end"]-t["study_start"]}' "$OUT/timings.txt" | tee -a "$OUT/timings.txt"
