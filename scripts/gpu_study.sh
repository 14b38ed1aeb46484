#!/usr/bin/env bash
# GPU verification (make gpu-study): on one H100/H200 with nothing but this repository,
# measure the benchmark and run the whole reference study on the real archive, with its
# fast path.
#
#   ARCHIVE=path/to/cifar10-jpeg.tar.gz scripts/gpu_study.sh
#   STAGES=bench scripts/gpu_study.sh      # or STAGES=cache, STAGES=study: one part per command
#   EXTRA="data.train_subset=256 ..." ...  # overrides for every training run (smoke tests)
#   STAGES=zoo CHUNK=540 scripts/gpu_study.sh   # the zoo's resnet32x4 -> resnet8x4, KD and
#                                             # DKD, 240 epochs, 9 minutes per invocation:
#                                             # run it again until it says "zoo: done"
#
# Stages: 1. install kdlight next to the machine's torch (wheels from .whl/ when the
# machine is offline); 2. python -m kdlight.cli.bench; 2b. its teacher-cache rows (the KD step
# and the grid live, filling and warm; a stage of its own, so that each fits one device
# command); 3. teacher (200 epochs) and student baseline (200 epochs) side by side on the
# one GPU, then the fused 12-cell T x alpha grid (200 epochs), then kdlight-report;
# 2c. (STAGES=zoo only, never by default) the zoo's reproduction in chunks, below.
#
# The figures go to $OUT (default outputs/gpu_study), nine files at most: device.txt,
# bench.json, bench_cache.json, timings.txt, report.md, report.csv, groups.csv, heatmap.png
# and, if a stage fails, log_ends.txt; the zoo stage adds zoo_progress.txt (a line per
# launch: finished, or the step and epoch reached) and, once all three runs are finished,
# zoo_table.md (measured test top-1 next to the published) and zoo_report.md.
# The data cache, the runs and the full logs go to $WORK (default $OUT/work).
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
  $PYTHON -m kdlight.cli.bench --no-cache --out "$OUT/bench.json" 2>&1 | tee "$WORK/bench.log" | grep -v Warning
  stamp bench_end
fi
if [[ " $STAGES " == *" cache "* ]]; then
  stamp cache_start
  $PYTHON -m kdlight.cli.bench --no-methods --no-zoo --no-overhead --out "$OUT/bench_cache.json" 2>&1 \
    | tee "$WORK/bench_cache.log" | grep -v Warning
  stamp cache_end
fi

# 2c. the zoo's reproduction in chunks (STAGES=zoo, run again until it says done): the
# teacher resnet32x4, then KD and DKD into resnet8x4 on CIFAR-100, 240 epochs each, as
# kdlight-train launches limited to what is left of this invocation's CHUNK. A launch whose
# limit runs out saves last.ckpt and exits 3; the next invocation launches the same command,
# which continues exactly. Each launch keeps ZOO_MARGIN seconds back: trainer.max_time
# counts training only, not the start-up before it (imports, data, sanity check), the
# overshoot after it (the batch or validation under way, the save) or the test of a run
# that finishes. Commands that finished are noted in $WORK/zoo/finished.txt and not
# launched again (a launch only to hear "finished already" costs a start-up).
if [[ " $STAGES " == *" zoo "* ]]; then
  CHUNK=${CHUNK:-540}           # the stage's seconds in this invocation (or DD:HH:MM:SS)
  # seconds kept back from each launch's trainer.max_time for what the limit does not count:
  # start-up (imports, CIFAR-100 to the GPU, sanity check: tens of seconds), the step or the
  # validation under way and the save when it runs out, and the test of a run that finishes
  # (seconds each). An estimate until measured: each progress line gives the launch's wall
  # time beside its limit, whose difference is what the margin has to cover.
  ZOO_MARGIN=${ZOO_MARGIN:-90}
  ZOO_EPOCHS=${ZOO_EPOCHS:-240}  # the recipe's (EPOCHS is the reference study's 200)
  ZOO_TEACHER=${ZOO_TEACHER:-resnet32x4}
  ZOO_STUDENT=${ZOO_STUDENT:-resnet8x4}
  if [[ -n ${CIFAR100_ARCHIVE:-} ]]; then
    ZOO_DATA=${ZOO_DATA:-data.source=archive data.archive_path=$CIFAR100_ARCHIVE}
  else
    ZOO_DATA=${ZOO_DATA:-data.download=true}  # torchvision's release, fetched once into $WORK/data
  fi
  ZOO_SPEED=${ZOO_SPEED-data.on_device=true}  # float32 as the official code; speed=fast: bf16
  if ! [[ $CHUNK =~ ^[0-9]+$|^[0-9]+:[0-9]+:[0-9]+:[0-9]+$ && $ZOO_MARGIN =~ ^[0-9]+$ ]]; then
    echo "error: CHUNK=$CHUNK and ZOO_MARGIN=$ZOO_MARGIN are not allowed: whole seconds (CHUNK also DD:HH:MM:SS)"
    exit 2
  fi
  if [[ $CHUNK == *:* ]]; then  # DD:HH:MM:SS, trainer.max_time's spelling
    IFS=: read -r d h m s <<<"$CHUNK"
    CHUNK=$(((10#$d * 24 + 10#$h) * 3600 + 10#$m * 60 + 10#$s))
  fi
  if ((ZOO_MARGIN >= CHUNK)); then  # no launch would ever start: no invocation would go on
    echo "error: CHUNK=$CHUNK s leaves no training time after ZOO_MARGIN=$ZOO_MARGIN s: give more than $ZOO_MARGIN s"
    exit 2
  fi
  zoo_root=$WORK/zoo
  mkdir -p "$zoo_root"
  touch "$zoo_root/finished.txt"
  stamp zoo_start
  zoo_started=$SECONDS  # the budget counts from here: the install check before is outside
  note() {  # one progress line: on stdout and in $OUT/zoo_progress.txt (rewritten whole)
    local line
    line="$(date -u +%FT%TZ) $1"
    echo "zoo: $1"
    { cat "$OUT/zoo_progress.txt" 2>/dev/null || true; echo "$line"; } >"$OUT/zoo_progress.txt.tmp"
    mv "$OUT/zoo_progress.txt.tmp" "$OUT/zoo_progress.txt"
  }
  zoo_runs=(teacher kd dkd)
  declare -A zoo_args=(
    [teacher]="experiment=zoo_teacher model=$ZOO_TEACHER"
    [kd]="experiment=zoo_distill pair=resnet32x4_resnet8x4 distiller=kd model=$ZOO_STUDENT distill.teacher_model=$ZOO_TEACHER"
    [dkd]="experiment=zoo_distill pair=resnet32x4_resnet8x4 distiller=dkd model=$ZOO_STUDENT distill.teacher_model=$ZOO_TEACHER"
  )
  for run in "${zoo_runs[@]}"; do
    # shellcheck disable=SC2086  # ZOO_DATA, ZOO_SPEED, EXTRA and the run's arguments are lists
    command="${zoo_args[$run]} paths.root=$zoo_root data.data_dir=$WORK/data $ZOO_DATA $ZOO_SPEED trainer.max_epochs=$ZOO_EPOCHS trainer.enable_progress_bar=false ~callbacks.progress_bar $EXTRA"
    if grep -qxF "$command" "$zoo_root/finished.txt"; then
      continue
    fi
    left=$((CHUNK - (SECONDS - zoo_started) - ZOO_MARGIN))
    if ((left < 1)); then
      note "$run: not started: $((left + ZOO_MARGIN)) s of this invocation's $CHUNK s left, not more than ZOO_MARGIN=$ZOO_MARGIN: run STAGES=zoo again to go on"
      exit 0
    fi
    started=$SECONDS
    rc=0
    # shellcheck disable=SC2086
    $PYTHON -m kdlight.train $command "++trainer.max_time=00:00:00:$left" >"$WORK/zoo_$run.launch.log" 2>&1 || rc=$?
    cat "$WORK/zoo_$run.launch.log" >>"$WORK/zoo_$run.log"
    took=$((SECONDS - started))
    error=$(grep '^error: ' "$WORK/zoo_$run.launch.log" | tail -n 1 || true)
    if ((rc == 0)); then
      { cat "$zoo_root/finished.txt"; echo "$command"; } >"$zoo_root/finished.txt.tmp"
      mv "$zoo_root/finished.txt.tmp" "$zoo_root/finished.txt"
      note "$run: finished (this launch: ${took} s, trainer.max_time ${left} s)"
    elif ((rc == 3)); then  # time ran out: last.ckpt holds the step reached
      progress=$(sed -nE 's/.*ran out at (step [0-9]+ \(epoch [0-9]+ of [0-9]+\)).*/\1/p' <<<"$error")
      note "$run: not finished: ${progress:-$error} (this launch: ${took} s, trainer.max_time ${left} s): run STAGES=zoo again to go on"
      exit 0
    else
      tail -n 5 "$WORK/zoo_$run.launch.log" >"$OUT/log_ends.txt"
      note "$run: failed with exit status $rc: ${error:-see $WORK/zoo_$run.log}"
      exit "$rc"
    fi
  done
  stamp zoo_end
  $PYTHON -m kdlight.cli.report "$zoo_root" --out "$WORK/zoo_report" >"$WORK/zoo_report.log" 2>&1
  cp "$WORK/zoo_report/report.md" "$OUT/zoo_report.md"
  $PYTHON scripts/zoo_table.py "$zoo_root" --teacher "$ZOO_TEACHER" --student "$ZOO_STUDENT" \
    --out "$OUT/zoo_table.md"
  cat "$OUT/zoo_table.md"
  note "done: teacher, KD and DKD finished; $OUT/zoo_table.md has their test accuracies next to the published ones"
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
$PYTHON -m kdlight.cli.report "$WORK/study" --out "$WORK/report" | tee "$WORK/report.log"
cp "$WORK"/report/{report.md,report.csv,groups.csv,heatmap.png} "$OUT/"
awk '{t[$1]=$2} END {printf "bench %ds, teacher+baseline %ds, grid %ds, study %ds\n", t["bench_end"]-t["bench_start"], t["teacher_and_baseline_end"]-t["study_start"], t["study_end"]-t["teacher_and_baseline_end"], t["study_end"]-t["study_start"]}' "$OUT/timings.txt" | tee -a "$OUT/timings.txt"
