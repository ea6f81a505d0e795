#!/usr/bin/env bash
# Frozen vs fine-tuned Uni-Mol for Energy-DPO, over seeds and datasets, then a summary per dataset.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'USAGE'
usage: run_finetune_comparison.sh [--demo] [--force] [--help]

Runs two arms per dataset and seed with the same --data_seed:
  frozen     Energy-DPO on frozen Uni-Mol features (head lr 1e-4)
  finetuned  --finetune_encoder --freeze_layers 0-12 --encoder_lr 5e-6 (head lr 1e-4)
then writes comparison_summary.{txt,json,csv} and comparison.png in OUTPUT_ROOT/<dataset>/.
Runs whose test_metrics.json exists are skipped; an interrupted run is resumed.

  --demo    the same sweep on the shipped demo scaffold benchmark, small sizes (CPU-friendly)
  --force   rerun finished runs (their results are replaced)

Environment overrides (defaults in brackets; --demo changes the marked ones):
  SEEDS           training seeds                       [42 43 44]
  DATASETS        dataset names                        [lbap_general_ec50_scaffold]  (demo: demo_ec50_scaffold)
  DATA_FILE       data file, one dataset only          [./data/raw/<dataset>.json]   (demo: data/demo/demo_ec50_scaffold.json)
  EPOCHS          max epochs                           [100]  (demo: 5)
  TRAIN_SIZE      training molecules per side          [2000] (demo: 200)
  VAL_SIZE        validation molecules per side        [600]  (demo: 100)
  TEST_SIZE       test molecules per side              [1000] (demo: 200)
  DATA_SEED       subsampling seed, shared by the arms [42]
  UNIMOL_WEIGHTS  checkpoint or 'random'               [weights/mol_pre_no_h_220816.pt] (demo: it if present, else random)
  OUTPUT_ROOT     where runs and summaries go          [./outputs/finetune_comparison] (demo: ./outputs/finetune_comparison_demo)
  DEVICE          auto, cpu, cuda, cuda:N              [auto]
  FREEZE_LAYERS   frozen layers of the fine-tuned arm  [0-12]
  ENCODER_LR      encoder learning rate                [5e-6]
  EXTRA_ARGS      more flags for every run             []
  PYTHON          interpreter                          [.venv/bin/python if present, else python3]
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

weights_default=weights/mol_pre_no_h_220816.pt
if [ "$demo" = 1 ]; then
  [ -f "$weights_default" ] || weights_default=random
  : "${DATASETS:=demo_ec50_scaffold}" "${DATA_FILE:=data/demo/demo_ec50_scaffold.json}"
  : "${EPOCHS:=5}" "${TRAIN_SIZE:=200}" "${VAL_SIZE:=100}" "${TEST_SIZE:=200}"
  : "${OUTPUT_ROOT:=./outputs/finetune_comparison_demo}"
fi
SEEDS=${SEEDS:-42 43 44}
DATASETS=${DATASETS:-lbap_general_ec50_scaffold}
EPOCHS=${EPOCHS:-100} TRAIN_SIZE=${TRAIN_SIZE:-2000} VAL_SIZE=${VAL_SIZE:-600} TEST_SIZE=${TEST_SIZE:-1000}
DATA_SEED=${DATA_SEED:-42}
UNIMOL_WEIGHTS=${UNIMOL_WEIGHTS:-$weights_default}
OUTPUT_ROOT=${OUTPUT_ROOT:-./outputs/finetune_comparison}
DEVICE=${DEVICE:-auto} FREEZE_LAYERS=${FREEZE_LAYERS:-0-12} ENCODER_LR=${ENCODER_LR:-5e-6}
EXTRA_ARGS=${EXTRA_ARGS:-}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

read -r -a datasets <<< "$DATASETS"
if [ -n "${DATA_FILE:-}" ] && [ "${#datasets[@]}" -ne 1 ]; then
  echo "error: DATA_FILE names one file but DATASETS has ${#datasets[@]} datasets" >&2; exit 2
fi

started=$(date +%s)
for dataset in "${datasets[@]}"; do
  data_file=${DATA_FILE:-./data/raw/$dataset.json}
  if [ ! -f "$data_file" ]; then
    echo "error: $data_file not found for dataset $dataset (set DATA_FILE, or see README 'Getting the real inputs')" >&2
    exit 1
  fi
  for seed in $SEEDS; do
    for arm in frozen finetuned; do
      run_dir="$OUTPUT_ROOT/$dataset/$arm/seed$seed"
      if [ -f "$run_dir/test_metrics.json" ] && [ "$force" = 0 ]; then
        echo "== $dataset $arm seed $seed: finished, skipping ($run_dir)"; continue
      fi
      mode_flag=()
      if [ "$force" = 1 ] || { [ -d "$run_dir" ] && [ ! -f "$run_dir/last.pt" ]; }; then mode_flag=(--overwrite)
      elif [ -f "$run_dir/last.pt" ]; then mode_flag=(--resume); fi
      arm_flags=()
      [ "$arm" = finetuned ] && arm_flags=(--finetune_encoder --freeze_layers "$FREEZE_LAYERS" --encoder_lr "$ENCODER_LR")
      echo "== $dataset $arm seed $seed -> $run_dir"
      # shellcheck disable=SC2086
      if ! "$PYTHON" main.py --mode train --dataset "$dataset" --data_file "$data_file" \
          --unimol_weights "$UNIMOL_WEIGHTS" --seed "$seed" --data_seed "$DATA_SEED" --epochs "$EPOCHS" \
          --train_size "$TRAIN_SIZE" --val_size "$VAL_SIZE" --test_size "$TEST_SIZE" --lr 1e-4 \
          --device "$DEVICE" --output_dir "$run_dir" "${arm_flags[@]}" "${mode_flag[@]}" $EXTRA_ARGS; then
        echo "error: run failed: $dataset $arm seed $seed (log: $run_dir/training.log); sweep stopped" >&2
        exit 1
      fi
    done
  done
  "$PYTHON" main.py --mode compare --output_dir "$OUTPUT_ROOT/$dataset"
done
echo "sweep finished in $(( $(date +%s) - started )) s; summaries under $OUTPUT_ROOT/<dataset>/comparison_summary.txt"
