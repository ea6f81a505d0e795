#!/usr/bin/env bash
# The experiment this tool exists for: frozen vs fine-tuned encoders (Uni-Mol, MiniMol, ...) for
# Energy-DPO, over datasets × seeds × arms, then a summary per dataset (comparison_summary.txt/.json/
# .csv and comparison.png in OUTPUT_ROOT/<dataset>/). `--help` lists its flags and environment
# variables; docs/finetuning.md explains the sweep.
#
#   datasets × seeds × arms (× encoders)  →  one main.py run each  →  main.py --mode compare per dataset
#
# What a run is, which encoders and arms exist and which flags fit them is main.py's knowledge, so
# the sweep is planned in Python (sweep_cli.py): every run's flags are checked by main.py before
# the first one starts, then the runs go one after the other, K at once (--jobs K), or are printed
# as shell lines for a scheduler (--print-commands). Runs are started from the caller's working
# directory: relative paths in the environment (DATA_FILE, OUTPUT_ROOT, UNIMOL_WEIGHTS, EXTRA_ARGS)
# resolve against it.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The interpreter of the sweep and of its runs: PYTHON, else the project's .venv, else python3
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$SCRIPT_DIR/.venv/bin/python" ]; then PYTHON=$SCRIPT_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
if ! command -v -- "$PYTHON" > /dev/null; then
  echo "error: PYTHON: '$PYTHON' is not an executable interpreter" >&2; exit 2
fi
export PYTHON
exec "$PYTHON" "$SCRIPT_DIR/sweep_cli.py" "$@"
