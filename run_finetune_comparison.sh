#!/usr/bin/env bash
# Frozen vs fine-tuned encoders (Uni-Mol, MiniMol) for Energy-DPO, over seeds and datasets, then a summary per dataset.
# Runs main.py by absolute path from the caller's working directory: relative paths in the
# environment (DATA_FILE, OUTPUT_ROOT, UNIMOL_WEIGHTS, EXTRA_ARGS) resolve against it.
set -euo pipefail

if (( BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4) )); then
  echo "error: run_finetune_comparison.sh needs bash 4.4 or newer (this is $BASH_VERSION)" >&2; exit 2
fi
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  cat <<'USAGE'
usage: run_finetune_comparison.sh [--demo] [--force] [--jobs K] [--print-commands] [--print-compare-commands] [--help]

Runs the arms in ARMS (default: frozen finetuned) per dataset and seed with the same --data_seed:
  frozen     Energy-DPO on frozen Uni-Mol features (the reference every other arm is compared with)
  finetuned  --finetune_encoder, with main.py's --freeze_layers and --encoder_lr defaults
  attention, ffn, lora   --finetune_encoder --finetune_strategy attention / ffn / lora
  <name>     any arm defined as ARM_<name>="main.py flags"
FOUNDATION_MODELS="minimol unimol" runs every arm for each encoder, in OUTPUT_ROOT/<dataset>/<encoder>/<arm>/
(with unimol alone, the default, the arms sit directly in OUTPUT_ROOT/<dataset>/); attention and ffn are
Uni-Mol arms. The summary then has one section per encoder, pretrained encoders first.
ENCODER_LRS="1e-6 5e-6 2e-5" and FREEZE_SPECS="0-12 0-10 none" expand each fine-tuned arm into one
arm per value (e.g. finetuned_lr1e-6_freeze0-10). Then writes comparison_summary.{txt,json,csv}
and comparison.png in OUTPUT_ROOT/<dataset>/.
Runs whose test_metrics.json exists are skipped; an interrupted run is resumed (every run gets
main.py's --auto_resume: finished -> exits 0 untouched, last.pt -> resumes, else starts).

  --demo    the same sweep on the shipped demo scaffold benchmark, small sizes (CPU-friendly), for both
            encoders (MiniMol's real weights; Uni-Mol's if present, else random-init)
  --force   rerun finished runs (their results are replaced): runs get --overwrite, not --auto_resume
  --jobs K  up to K runs at once on this machine [1: one after the other]. With K > 1 each run's
            output goes to RUN/sweep_console.log (main.py also writes RUN/training.log), a line says
            when each run starts and ends, and a dataset's summary is written once all its runs
            have ended. The first failed run stops the launching of new ones: the running ones are
            waited for, the failed ones are named, and the exit status is 1. The runs share the
            caches (safe: cache writes are atomic) and the cores: with EXTRA_ARGS='--num_workers N'
            each run starts N conformer processes.
            GPUs: with JOB_GPUS="0 1 2 3", the run in slot i (0..K-1) gets CUDA_VISIBLE_DEVICES set
            to JOB_GPUS' entry i mod its length (K=4: one run per GPU; K=8: two per GPU; an entry
            may be a list such as 0,1). Without JOB_GPUS, CUDA_VISIBLE_DEVICES is left alone, so
            every run sees the same GPUs.
  --print-commands
            run nothing; print one line per run to stdout (datasets, then seeds, then arms: line N
            is run N), e.g. for a SLURM array: sed -n "${SLURM_ARRAY_TASK_ID}p" runs.txt | bash
            Each line is a whole shell command: cd to this directory (relative paths resolve there,
            as in the sweep), then the interpreter and main.py by absolute path, every word quoted
            (printf %q), with --auto_resume, so running a line again is safe: a finished run exits
            0 untouched, an interrupted one resumes. With --force the lines carry --overwrite
            instead and rerun from scratch each time. Without UNIMOL_WEIGHTS the lines name
            main.py's default checkpoint (they do not depend on the UNIMOL_WEIGHT_DIR where they run).
  --print-compare-commands
            run nothing; print each dataset's --mode compare line, to run once its runs have
            finished. With --print-commands too, these lines come after all run lines.
  Printing runs and creates nothing; it checks the settings and that the data files exist. The
  lines need this directory, the interpreter and the data at the same paths where they run.

Environment overrides. The sweep has no defaults of its own for main.py's settings: a variable
that is unset (or empty) passes no flag, so main.py's default applies (shown as [main.py's]; `python
main.py --help` and docs/cli.md list them).
Relative paths resolve against the current directory; --demo changes the marked defaults.
  SEEDS           training seeds                       [42 43 44]
  FOUNDATION_MODELS  encoders, each runs every arm     [unimol] (demo: minimol unimol)
  DATASETS        dataset names                        [DATA_FILE's stem if set, else lbap_general_ec50_scaffold]
                                                       (demo: demo_ec50_scaffold)
  DATA_FILE       data file, one dataset only          [./data/raw/<dataset>.json]
                                                       (demo: the shipped data/demo/demo_ec50_scaffold.json)
  EPOCHS          max epochs, --epochs                 [main.py's] (demo: 5)
  BATCH_SIZE      molecules per side per step          [main.py's]
  TRAIN_SIZE      training molecules per side          [main.py's] (demo: 200)
  VAL_SIZE        validation molecules per side        [main.py's] (demo: 100)
  TEST_SIZE       test molecules per side              [main.py's] (demo: 200)
  DATA_SEED       subsampling seed, shared by the arms [main.py's]
  UNIMOL_WEIGHTS  checkpoint or 'random' (Uni-Mol runs) [main.py's]
                                                       (demo: main.py's default file if present, else random)
  DEVICE          auto, cpu, cuda, cuda:N              [main.py's]
  OOD_VAL_SPLIT   random or domain (honest validation) [main.py's]
  FREEZE_LAYERS   frozen layers of the fine-tuned arm  [main.py's]
  ENCODER_LR      encoder learning rate (fine-tuned)   [main.py's]
  OUTPUT_ROOT     where runs and summaries go          [./outputs/finetune_comparison]
                                                       (demo: ./outputs/finetune_comparison_demo)
  MINIMOL_ARGS, UNIMOL_ARGS  more main.py flags for that encoder's runs (after the ones above) []
                                                       (demo: MINIMOL_ARGS='--epochs 20 --batch_size 32';
                                                       random-init Uni-Mol: UNIMOL_ARGS='--train_size 100
                                                       --val_size 50 --test_size 100')
  EXTRA_ARGS      more main.py flags for every run, split with shell quoting rules
                  (e.g. EXTRA_ARGS='--cache_dir "/data/my cache" --num_workers 4')      []
  PYTHON          interpreter                          [.venv/bin/python next to this script if present, else python3]
  JOB_GPUS        GPUs for the --jobs slots, e.g. "0 1 2 3" (see --jobs)             []
The head learning rate is main.py's --lr; change it with EXTRA_ARGS='--lr ...'.
USAGE
}

demo=0 force=0 jobs=1 jobs_given=0 print_runs=0 print_compare=0
while [ "$#" -gt 0 ]; do
  case "$1" in
    --demo) demo=1 ;;
    --force) force=1 ;;
    --jobs)
      if [ "$#" -lt 2 ]; then echo "error: --jobs needs the number of runs at once (see --help)" >&2; exit 2; fi
      jobs=$2 jobs_given=1; shift ;;
    --jobs=*) jobs=${1#--jobs=} jobs_given=1 ;;
    --print-commands) print_runs=1 ;;
    --print-compare-commands) print_compare=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ ! $jobs =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --jobs takes the number of runs at once, 1 or more, not '$jobs'" >&2; exit 2
fi
printing=$(( print_runs || print_compare ))
if [ "$printing" = 1 ] && [ "$jobs_given" = 1 ]; then
  echo "error: --jobs runs the sweep on this machine; --print-commands / --print-compare-commands run nothing" >&2
  exit 2
fi
read -r -a job_gpus <<< "${JOB_GPUS:-}"
if [ -n "${JOB_GPUS:-}" ] && [ "$printing" = 1 ]; then
  echo "error: JOB_GPUS assigns GPUs to --jobs slots; printed commands get theirs from whatever runs them (unset JOB_GPUS)" >&2
  exit 2
fi
if [ -n "${JOB_GPUS:-}" ] && [ "${#job_gpus[@]}" -eq 0 ]; then
  echo "error: JOB_GPUS names no GPU (e.g. JOB_GPUS=\"0 1\")" >&2; exit 2
fi

note() {  # progress lines: stdout, but stderr when printing commands (stdout is for the commands)
  if [ "$printing" = 1 ]; then echo "$@" >&2; else echo "$@"; fi
}

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$SCRIPT_DIR/.venv/bin/python" ]; then PYTHON=$SCRIPT_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
MAIN=$SCRIPT_DIR/main.py
if [ "$printing" = 1 ]; then  # printed lines name the interpreter by absolute path
  python_path=$(command -v -- "$PYTHON" || true)
  if [[ $python_path == */* && $python_path != /* ]]; then python_path=$PWD/$python_path; fi
  if [[ $python_path != /* ]] || [ ! -x "$python_path" ]; then
    echo "error: PYTHON: '$PYTHON' is not an executable interpreter" >&2; exit 2
  fi
fi

main_default_weights() {  # main.py's own default checkpoint (it honours UNIMOL_WEIGHT_DIR), asked rather than repeated here
  "$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); from settings import default_weights_path; print(default_weights_path())' "$SCRIPT_DIR"
}

weights_default=
if [ "$demo" = 1 ]; then
  if [ -z "${DATASETS:-}" ] && [ -z "${DATA_FILE:-}" ]; then DATASETS=demo_ec50_scaffold; fi
  : "${DATA_FILE:=$SCRIPT_DIR/data/demo/demo_ec50_scaffold.json}"
  : "${EPOCHS:=5}" "${TRAIN_SIZE:=200}" "${VAL_SIZE:=100}" "${TEST_SIZE:=200}"
  : "${FOUNDATION_MODELS:=minimol unimol}"
  # MiniMol's recipe: enough optimizer steps that its head learns (5 one-step epochs do not); Uni-Mol's
  # fine-tuned steps cost ~10x more on CPU, so it keeps the 5 epochs of the main.py batch sizes
  : "${MINIMOL_ARGS=--epochs 20 --batch_size 32}"
  : "${OUTPUT_ROOT:=./outputs/finetune_comparison_demo}"
  if [ -z "${UNIMOL_WEIGHTS:-}" ]; then
    weights_default=$(main_default_weights)
    if [ -f "$weights_default" ]; then
      note "== demo: Uni-Mol weights $weights_default"
    else
      note "== demo: no checkpoint at $weights_default; using a random-init encoder (UNIMOL_WEIGHTS=random)"
      UNIMOL_WEIGHTS=random
      # its rows only show that the pipeline runs (they say nothing about Uni-Mol): half the molecules,
      # which halves Uni-Mol's cold-cache conformers, features and prefix states and keeps the demo short
      : "${UNIMOL_ARGS=--train_size 100 --val_size 50 --test_size 100}"
    fi
  fi
fi

read -r -a seeds <<< "${SEEDS:-42 43 44}"
OUTPUT_ROOT=${OUTPUT_ROOT:-./outputs/finetune_comparison}
if [ -n "${DATASETS:-}" ]; then
  read -r -a datasets <<< "$DATASETS"
elif [ -n "${DATA_FILE:-}" ]; then
  stem=$(basename -- "$DATA_FILE")
  stem=${stem%.json} stem=${stem%.csv}
  datasets=("$stem")
else
  datasets=(lbap_general_ec50_scaffold)
fi
if [ "${#datasets[@]}" -eq 0 ] || [ "${#seeds[@]}" -eq 0 ]; then
  echo "error: DATASETS and SEEDS must name at least one dataset and seed" >&2; exit 2
fi
if [ -n "${DATA_FILE:-}" ] && [ "${#datasets[@]}" -ne 1 ]; then
  echo "error: DATA_FILE names one file but DATASETS has ${#datasets[@]} datasets" >&2; exit 2
fi

# main.py flags, only for the variables that are set; unset ones leave main.py's defaults in force
common=() finetune=()
add_flag() {  # add_flag ARRAY FLAG VARIABLE
  local value=${!3:-}
  if [ -n "$value" ]; then
    local -n into=$1
    into+=("$2" "$value")
  fi
}
add_flag common --epochs EPOCHS
add_flag common --batch_size BATCH_SIZE
add_flag common --train_size TRAIN_SIZE
add_flag common --val_size VAL_SIZE
add_flag common --test_size TEST_SIZE
add_flag common --data_seed DATA_SEED
unimol_only=()  # flags of the Uni-Mol runs only (MiniMol's weights ship with it)
add_flag unimol_only --unimol_weights UNIMOL_WEIGHTS
add_flag common --device DEVICE
add_flag common --ood_val_split OOD_VAL_SPLIT
add_flag finetune --freeze_layers FREEZE_LAYERS
add_flag finetune --encoder_lr ENCODER_LR
if [ "$printing" = 1 ] && [ -z "${UNIMOL_WEIGHTS:-}" ]; then
  # the default spelled out: a printed line must not depend on the UNIMOL_WEIGHT_DIR of the shell that
  # runs it (config.json records the same resolved path as a run of the sweep itself)
  if [ -z "$weights_default" ]; then weights_default=$(main_default_weights); fi
  unimol_only+=(--unimol_weights "$weights_default")
fi

split_words() {  # split_words ARRAY NAME TEXT: TEXT split with shell quoting rules (Python's shlex), never eval'd
  local -n into=$1
  into=()
  if [ -n "$3" ]; then
    mapfile -d '' -t into < <("$PYTHON" -c '
import shlex, sys
try:
    words = shlex.split(sys.argv[2])
except ValueError as exc:
    sys.exit(f"error: {sys.argv[1]}: {exc}: {sys.argv[2]}")
sys.stdout.write("".join(word + "\0" for word in words))' "$2" "$3")
    wait "$!" || exit 2
  fi
}
split_words extra EXTRA_ARGS "${EXTRA_ARGS:-}"
split_words minimol_args MINIMOL_ARGS "${MINIMOL_ARGS:-}"
split_words unimol_args UNIMOL_ARGS "${UNIMOL_ARGS:-}"
if [[ " ${extra[*]} " == *" --force_recompute_cache "* ]] && { [ "$jobs" -gt 1 ] || [ "$printing" = 1 ]; }; then
  # it deletes the caches that runs started alongside are reading
  echo "error: EXTRA_ARGS: --force_recompute_cache with runs at once (--jobs, printed commands) would delete caches" \
       "other runs are reading; clear the cache folder before the sweep instead" >&2
  exit 2
fi

# Arms: built-in ones, or ARM_<name>="flags". Fine-tuned arms (those with --finetune_encoder) are
# expanded into one arm per ENCODER_LRS value and per FREEZE_SPECS value when those are set.
declare -A builtin_arms=(
  [frozen]="" [finetuned]="--finetune_encoder" [attention]="--finetune_encoder --finetune_strategy attention"
  [ffn]="--finetune_encoder --finetune_strategy ffn" [lora]="--finetune_encoder --finetune_strategy lora")
read -r -a arm_names <<< "${ARMS:-frozen finetuned}"
read -r -a encoder_lrs <<< "${ENCODER_LRS:-}"
read -r -a freeze_specs <<< "${FREEZE_SPECS:-}"
[ "${#encoder_lrs[@]}" -gt 0 ] || encoder_lrs=("")
[ "${#freeze_specs[@]}" -gt 0 ] || freeze_specs=("")
arms=()
declare -A arm_flags_of
for name in "${arm_names[@]}"; do
  if [[ ! $name =~ ^[A-Za-z0-9_]+$ ]]; then
    echo "error: ARMS: '$name' is not a valid arm name (letters, digits, _)" >&2; exit 2
  fi
  custom="ARM_$name"
  if [ -n "${!custom:-}" ]; then flags=${!custom}
  elif [ -n "${builtin_arms[$name]+set}" ]; then flags=${builtin_arms[$name]}
  else
    echo "error: ARMS: unknown arm '$name'; built-in: ${!builtin_arms[*]}, or define ARM_$name=\"flags\"" >&2; exit 2
  fi
  if [[ " $flags " != *" --finetune_encoder "* ]]; then
    arms+=("$name"); arm_flags_of[$name]=$flags; continue
  fi
  for lr in "${encoder_lrs[@]}"; do
    for spec in "${freeze_specs[@]}"; do
      arm=$name extra_flags=$flags
      if [ -n "$lr" ]; then arm+="_lr$lr"; extra_flags+=" --encoder_lr $lr"; fi
      if [ -n "$spec" ]; then arm+="_freeze$spec"; extra_flags+=" --freeze_layers $spec"; fi
      arms+=("$arm"); arm_flags_of[$arm]=$extra_flags
    done
  done
done
if [[ " ${arms[*]} " != *" frozen "* ]]; then
  echo "error: ARMS must include frozen, the arm every other arm is compared with" >&2; exit 2
fi
# Encoders: with anything but unimol alone, each runs every arm, as arm "<encoder>/<arm>" (its folder).
read -r -a encoders <<< "${FOUNDATION_MODELS:-unimol}"
if [ "${#encoders[@]}" -eq 0 ]; then echo "error: FOUNDATION_MODELS names no encoder (unimol, minimol)" >&2; exit 2; fi
for encoder in "${encoders[@]}"; do
  if [ "$encoder" != unimol ] && [ "$encoder" != minimol ]; then
    echo "error: FOUNDATION_MODELS: unknown encoder '$encoder' (unimol, minimol)" >&2; exit 2
  fi
done
refuse_encoder_repeats() { local -A seen=(); local e; for e in "$@"; do
  if [ -n "${seen[$e]+set}" ]; then echo "error: FOUNDATION_MODELS gives $e twice" >&2; exit 2; fi; seen[$e]=1; done; }
refuse_encoder_repeats "${encoders[@]}"
if [ "${encoders[*]}" != unimol ]; then
  per_encoder=()
  for encoder in "${encoders[@]}"; do
    for arm in "${arms[@]}"; do
      flags=${arm_flags_of[$arm]}
      if [ "$encoder" = minimol ]; then
        if [[ " $flags " =~ " --finetune_strategy "(attention|ffn)" " ]]; then
          echo "error: ARMS: arm '$arm' trains Uni-Mol's ${BASH_REMATCH[1]} parts; MiniMol takes layers or lora" \
               "(drop it, or run FOUNDATION_MODELS=unimol)" >&2
          exit 2
        fi
        flags="--foundation_model minimol $flags"
      fi
      per_encoder+=("$encoder/$arm"); arm_flags_of[$encoder/$arm]=$flags
    done
  done
  arms=("${per_encoder[@]}")
fi
refuse_repeats() {  # refuse_repeats FORMAT WORDS...: a word given twice (FORMAT's %s) would be one run folder twice
  local -A seen=()
  local word
  for word in "${@:2}"; do
    if [ -n "${seen[$word]+set}" ]; then printf "error: $1\n" "$word" >&2; exit 2; fi
    seen[$word]=1
  done
}
refuse_repeats "SEEDS gives seed %s twice" "${seeds[@]}"
refuse_repeats "DATASETS gives dataset %s twice" "${datasets[@]}"
refuse_repeats "ARMS gives arm %s twice (after the ENCODER_LRS / FREEZE_SPECS expansion)" "${arms[@]}"

data_files=()
for dataset in "${datasets[@]}"; do
  data_file=${DATA_FILE:-./data/raw/$dataset.json}
  if [ ! -f "$data_file" ]; then
    echo "error: $data_file not found for dataset $dataset (set DATA_FILE, or see README 'Getting the real inputs')" >&2
    exit 1
  fi
  data_files+=("$data_file")
done

# Every run gets --auto_resume (main.py: a finished run exits 0 untouched, an interrupted one resumes
# from last.pt, anything else starts), or --overwrite with --force: the same in this script's loop and
# in printed lines, so a line run twice, or a requeued array task, does the right thing.
if [ "$force" = 1 ]; then mode_flag=(--overwrite); else mode_flag=(--auto_resume); fi
run_folder() {  # run_folder DATASET ARM SEED: sets run_dir (sweep.py reads the same layout)
  run_dir="$OUTPUT_ROOT/$1/$2/seed$3"
}
skip_finished() {  # skip_finished DATASET ARM SEED: sets run_dir; true (and says so) for a finished run to skip
  run_folder "$1" "$2" "$3"
  # finished = main.py's test_metrics.json exists (runs.FINISHED: written last)
  if [ -f "$run_dir/test_metrics.json" ] && [ "$force" = 0 ]; then
    echo "== $1 $2 seed $3: finished, skipping ($run_dir)"; return 0
  fi
  return 1
}
build_run() {  # build_run DATASET DATA_FILE ARM SEED: sets run_dir and run_args (main.py's arguments)
  run_folder "$1" "$3" "$4"
  split_words arm_flags "ARM_$3" "${arm_flags_of[$3]}"
  # FREEZE_LAYERS / ENCODER_LR first: an arm's own flags (and the expansions) come later and win
  if [[ " ${arm_flags[*]} " == *" --finetune_encoder "* ]]; then arm_flags=("${finetune[@]}" "${arm_flags[@]}"); fi
  local encoder_flags=("${unimol_only[@]}" "${unimol_args[@]}")
  if [[ $3 == minimol/* ]]; then encoder_flags=("${minimol_args[@]}"); fi
  run_args=(--mode train --dataset "$1" --data_file "$2" --seed "$4" --output_dir "$run_dir" "${common[@]}"
            "${encoder_flags[@]}" "${arm_flags[@]}" "${mode_flag[@]}" "${extra[@]}")
}
set_gpu_env() {  # set_gpu_env SLOT: gpu_env, the prefix giving a run in SLOT its JOB_GPUS entry (none without JOB_GPUS)
  gpu_env=() gpu_note=""
  if [ "${#job_gpus[@]}" -gt 0 ]; then
    gpu_env=(env "CUDA_VISIBLE_DEVICES=${job_gpus[$1 % ${#job_gpus[@]}]}")
    gpu_note=" on CUDA_VISIBLE_DEVICES=${job_gpus[$1 % ${#job_gpus[@]}]}"
  fi
}

if [ "$printing" = 1 ]; then
  command_line() {  # command_line ARGS...: one line that runs main.py with ARGS from this directory, from anywhere
    printf 'cd -- %q && %q %q' "$PWD" "$python_path" "$MAIN"
    printf ' %q' "$@"
    printf '\n'
  }
  if [ "$print_runs" = 1 ]; then
    for i in "${!datasets[@]}"; do
      for seed in "${seeds[@]}"; do
        for arm in "${arms[@]}"; do
          build_run "${datasets[$i]}" "${data_files[$i]}" "$arm" "$seed"
          command_line "${run_args[@]}"
        done
      done
    done
  fi
  if [ "$print_compare" = 1 ]; then
    for dataset in "${datasets[@]}"; do command_line --mode compare --output_dir "$OUTPUT_ROOT/$dataset"; done
  fi
  exit 0
fi

started=$(date +%s)
if [ "$jobs" = 1 ]; then
  set_gpu_env 0
  for i in "${!datasets[@]}"; do
    dataset=${datasets[$i]}
    for seed in "${seeds[@]}"; do
      for arm in "${arms[@]}"; do
        if skip_finished "$dataset" "$arm" "$seed"; then continue; fi
        build_run "$dataset" "${data_files[$i]}" "$arm" "$seed"
        echo "== $dataset $arm seed $seed -> $run_dir$gpu_note"
        if ! "${gpu_env[@]}" "$PYTHON" "$MAIN" "${run_args[@]}"; then
          echo "error: run failed: $dataset $arm seed $seed (log: $run_dir/training.log); sweep stopped" >&2
          exit 1
        fi
      done
    done
    "$PYTHON" "$MAIN" --mode compare --output_dir "$OUTPUT_ROOT/$dataset"
  done
  echo "sweep finished in $(( $(date +%s) - started )) s; summaries under $OUTPUT_ROOT/<dataset>/comparison_summary.txt"
  exit 0
fi

# --jobs K > 1: up to K runs in the background, each in a slot 0..K-1 (its JOB_GPUS entry); bash job
# control only. A dataset's summary is written (in the foreground) once all its runs have ended.
declare -A run_name=() run_dir_of=() run_slot=() run_start=() run_dataset=() runs_left=() queued=()
free_slots=() failed=()
for (( slot = 0; slot < jobs; slot++ )); do free_slots+=("$slot"); done

stop_runs() {  # on exit with runs still going (an interrupted sweep): stop them; the next sweep resumes or restarts them
  if [ "${#run_name[@]}" -gt 0 ]; then
    echo "== stopping ${#run_name[@]} running run(s) (the next sweep resumes or restarts them): ${run_dir_of[*]}" >&2
    kill -TERM "${!run_name[@]}" 2>/dev/null || true
    wait "${!run_name[@]}" 2>/dev/null || true
  fi
}
trap stop_runs EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

summarize_when_done() {  # summarize_when_done DATASET: its summary once all its runs are queued and ended, unless a run failed
  local dataset=$1
  if [ "${queued[$dataset]:-}" != all ] || [ "${runs_left[$dataset]:-0}" != 0 ] || [ "${#failed[@]}" -gt 0 ]; then return; fi
  queued[$dataset]=summarized
  echo "== $dataset: all runs finished; writing the summary"
  if ! "$PYTHON" "$MAIN" --mode compare --output_dir "$OUTPUT_ROOT/$dataset"; then
    echo "error: the summary of $dataset failed" >&2
    failed+=("the summary of $dataset")
  fi
}

launch() {  # launch DATASET ARM SEED: the run build_run made, in the background in a free slot
  local slot=${free_slots[0]} pid
  free_slots=("${free_slots[@]:1}")
  if ! mkdir -p -- "$run_dir" 2>/dev/null || [ ! -d "$run_dir" ]; then
    echo "error: run failed: $1 $2 seed $3: cannot create the folder $run_dir" >&2
    failed+=("$1 $2 seed $3"); free_slots+=("$slot"); return
  fi
  set_gpu_env "$slot"
  "${gpu_env[@]}" "$PYTHON" "$MAIN" "${run_args[@]}" > "$run_dir/sweep_console.log" 2>&1 < /dev/null &
  pid=$!
  run_name[$pid]="$1 $2 seed $3" run_dir_of[$pid]=$run_dir run_slot[$pid]=$slot run_start[$pid]=$SECONDS
  run_dataset[$pid]=$1 runs_left[$1]=$(( ${runs_left[$1]:-0} + 1 ))
  echo "== $1 $2 seed $3 -> $run_dir (started$gpu_note; output in $run_dir/sweep_console.log)"
}

reap() {  # wait until at least one run has ended; report each one that has
  local pid status running ended=0 dataset
  while :; do
    running=$'\n'"$(jobs -rp)"$'\n'
    for pid in "${!run_name[@]}"; do
      if [[ $running == *$'\n'"$pid"$'\n'* ]]; then continue; fi
      status=0; wait "$pid" || status=$?
      if [ "$status" = 0 ]; then
        echo "== ${run_name[$pid]}: finished in $(( SECONDS - run_start[$pid] )) s"
      else
        echo "error: run failed (exit $status): ${run_name[$pid]} (output: ${run_dir_of[$pid]}/sweep_console.log," \
             "log: ${run_dir_of[$pid]}/training.log)" >&2
        failed+=("${run_name[$pid]}")
      fi
      dataset=${run_dataset[$pid]}
      free_slots+=("${run_slot[$pid]}") runs_left[$dataset]=$(( ${runs_left[$dataset]} - 1 ))
      unset "run_name[$pid]" "run_dir_of[$pid]" "run_slot[$pid]" "run_start[$pid]" "run_dataset[$pid]"
      summarize_when_done "$dataset"
      ended=1
    done
    if [ "$ended" = 1 ]; then return; fi
    wait -n 2>/dev/null || true  # returns once any background job ends; its status is read by pid above
  done
}

for i in "${!datasets[@]}"; do
  dataset=${datasets[$i]}
  for seed in "${seeds[@]}"; do
    for arm in "${arms[@]}"; do
      if [ "${#failed[@]}" -gt 0 ]; then break 3; fi
      if skip_finished "$dataset" "$arm" "$seed"; then continue; fi
      build_run "$dataset" "${data_files[$i]}" "$arm" "$seed"
      while [ "${#free_slots[@]}" -eq 0 ]; do reap; done
      if [ "${#failed[@]}" -gt 0 ]; then break 3; fi
      launch "$dataset" "$arm" "$seed"
    done
  done
  queued[$dataset]=all
  summarize_when_done "$dataset"
done
if [ "${#failed[@]}" -gt 0 ] && [ "${#run_name[@]}" -gt 0 ]; then
  echo "== a run failed: launching no more; waiting for the ${#run_name[@]} running run(s)" >&2
fi
while [ "${#run_name[@]}" -gt 0 ]; do reap; done
if [ "${#failed[@]}" -gt 0 ]; then
  failed_list=$(printf '%s; ' "${failed[@]}")
  echo "error: sweep stopped; failed: ${failed_list%; } (finished runs are kept; the next sweep resumes the rest)" >&2
  exit 1
fi
echo "sweep finished in $(( $(date +%s) - started )) s; summaries under $OUTPUT_ROOT/<dataset>/comparison_summary.txt"
