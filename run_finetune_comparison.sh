#!/usr/bin/env bash
# Frozen vs fine-tuned Uni-Mol for Energy-DPO, over seeds and datasets, then a summary per dataset.
# Runs main.py by absolute path from the caller's working directory: relative paths in the
# environment (DATA_FILE, OUTPUT_ROOT, UNIMOL_WEIGHTS, EXTRA_ARGS) resolve against it.
set -euo pipefail

if (( BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4) )); then
  echo "error: run_finetune_comparison.sh needs bash 4.4 or newer (this is $BASH_VERSION)" >&2; exit 2
fi
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  cat <<'USAGE'
usage: run_finetune_comparison.sh [--demo] [--force] [--help]

Runs the arms in ARMS (default: frozen finetuned) per dataset and seed with the same --data_seed:
  frozen     Energy-DPO on frozen Uni-Mol features (the reference every other arm is compared with)
  finetuned  --finetune_encoder, with main.py's --freeze_layers (0-12) and --encoder_lr (5e-6)
  attention, ffn, lora   --finetune_encoder --finetune_strategy attention / ffn / lora
  <name>     any arm defined as ARM_<name>="main.py flags"
ENCODER_LRS="1e-6 5e-6 2e-5" and FREEZE_SPECS="0-12 0-10 none" expand each fine-tuned arm into one
arm per value (e.g. finetuned_lr1e-6_freeze0-10). Then writes comparison_summary.{txt,json,csv}
and comparison.png in OUTPUT_ROOT/<dataset>/.
Runs whose test_metrics.json exists are skipped; an interrupted run is resumed.

  --demo    the same sweep on the shipped demo scaffold benchmark, small sizes (CPU-friendly)
  --force   rerun finished runs (their results are replaced)

Environment overrides. The sweep has no defaults of its own for main.py's settings: a variable
that is unset (or empty) passes no flag, so main.py's default applies (shown as main.py: ...).
Relative paths resolve against the current directory; --demo changes the marked defaults.
  SEEDS           training seeds                       [42 43 44]
  DATASETS        dataset names                        [DATA_FILE's stem if set, else lbap_general_ec50_scaffold]
                                                       (demo: demo_ec50_scaffold)
  DATA_FILE       data file, one dataset only          [./data/raw/<dataset>.json]
                                                       (demo: the shipped data/demo/demo_ec50_scaffold.json)
  EPOCHS          max epochs, --epochs                 [main.py: 100]  (demo: 5)
  TRAIN_SIZE      training molecules per side          [main.py: 2000] (demo: 200)
  VAL_SIZE        validation molecules per side        [main.py: 600]  (demo: 100)
  TEST_SIZE       test molecules per side              [main.py: 1000] (demo: 200)
  DATA_SEED       subsampling seed, shared by the arms [main.py: 42]
  UNIMOL_WEIGHTS  checkpoint or 'random'               [main.py: $UNIMOL_WEIGHT_DIR/mol_pre_no_h_220816.pt
                                                        if UNIMOL_WEIGHT_DIR is set, else ./weights/mol_pre_no_h_220816.pt]
                                                       (demo: that file if present, else random)
  DEVICE          auto, cpu, cuda, cuda:N              [main.py: auto]
  OOD_VAL_SPLIT   random or domain (honest validation) [main.py: random]
  FREEZE_LAYERS   frozen layers of the fine-tuned arm  [main.py: 0-12]
  ENCODER_LR      encoder learning rate (fine-tuned)   [main.py: 5e-6]
  OUTPUT_ROOT     where runs and summaries go          [./outputs/finetune_comparison]
                                                       (demo: ./outputs/finetune_comparison_demo)
  EXTRA_ARGS      more main.py flags for every run, split with shell quoting rules
                  (e.g. EXTRA_ARGS='--cache_dir "/data/my cache" --num_workers 4')      []
  PYTHON          interpreter                          [.venv/bin/python next to this script if present, else python3]
The head learning rate is main.py's --lr (1e-4); change it with EXTRA_ARGS='--lr ...'.
USAGE
}

demo=0 force=0
for arg in "$@"; do
  case "$arg" in
    --demo) demo=1 ;;
    --force) force=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$SCRIPT_DIR/.venv/bin/python" ]; then PYTHON=$SCRIPT_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
MAIN=$SCRIPT_DIR/main.py

if [ "$demo" = 1 ]; then
  if [ -z "${DATASETS:-}" ] && [ -z "${DATA_FILE:-}" ]; then DATASETS=demo_ec50_scaffold; fi
  : "${DATA_FILE:=$SCRIPT_DIR/data/demo/demo_ec50_scaffold.json}"
  : "${EPOCHS:=5}" "${TRAIN_SIZE:=200}" "${VAL_SIZE:=100}" "${TEST_SIZE:=200}"
  : "${OUTPUT_ROOT:=./outputs/finetune_comparison_demo}"
  if [ -z "${UNIMOL_WEIGHTS:-}" ]; then
    # main.py's own default (it honours UNIMOL_WEIGHT_DIR), asked rather than repeated here
    weights_default=$("$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); from data import default_weights_path; print(default_weights_path())' "$SCRIPT_DIR")
    if [ -f "$weights_default" ]; then
      echo "== demo: Uni-Mol weights $weights_default"
    else
      echo "== demo: no checkpoint at $weights_default; using a random-init encoder (UNIMOL_WEIGHTS=random)"
      UNIMOL_WEIGHTS=random
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
add_flag common --train_size TRAIN_SIZE
add_flag common --val_size VAL_SIZE
add_flag common --test_size TEST_SIZE
add_flag common --data_seed DATA_SEED
add_flag common --unimol_weights UNIMOL_WEIGHTS
add_flag common --device DEVICE
add_flag common --ood_val_split OOD_VAL_SPLIT
add_flag finetune --freeze_layers FREEZE_LAYERS
add_flag finetune --encoder_lr ENCODER_LR

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

started=$(date +%s)
for dataset in "${datasets[@]}"; do
  data_file=${DATA_FILE:-./data/raw/$dataset.json}
  if [ ! -f "$data_file" ]; then
    echo "error: $data_file not found for dataset $dataset (set DATA_FILE, or see README 'Getting the real inputs')" >&2
    exit 1
  fi
  for seed in "${seeds[@]}"; do
    for arm in "${arms[@]}"; do
      run_dir="$OUTPUT_ROOT/$dataset/$arm/seed$seed"
      if [ -f "$run_dir/test_metrics.json" ] && [ "$force" = 0 ]; then
        echo "== $dataset $arm seed $seed: finished, skipping ($run_dir)"; continue
      fi
      mode_flag=()
      if [ "$force" = 1 ] || { [ -d "$run_dir" ] && [ ! -f "$run_dir/last.pt" ]; }; then mode_flag=(--overwrite)
      elif [ -f "$run_dir/last.pt" ]; then mode_flag=(--resume); fi
      split_words arm_flags "ARM_$arm" "${arm_flags_of[$arm]}"
      # FREEZE_LAYERS / ENCODER_LR first: an arm's own flags (and the expansions) come later and win
      if [[ " ${arm_flags[*]} " == *" --finetune_encoder "* ]]; then arm_flags=("${finetune[@]}" "${arm_flags[@]}"); fi
      echo "== $dataset $arm seed $seed -> $run_dir"
      if ! "$PYTHON" "$MAIN" --mode train --dataset "$dataset" --data_file "$data_file" --seed "$seed" \
          --output_dir "$run_dir" "${common[@]}" "${arm_flags[@]}" "${mode_flag[@]}" "${extra[@]}"; then
        echo "error: run failed: $dataset $arm seed $seed (log: $run_dir/training.log); sweep stopped" >&2
        exit 1
      fi
    done
  done
  "$PYTHON" "$MAIN" --mode compare --output_dir "$OUTPUT_ROOT/$dataset"
done
echo "sweep finished in $(( $(date +%s) - started )) s; summaries under $OUTPUT_ROOT/<dataset>/comparison_summary.txt"
