PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# The frozen-vs-fine-tuned sweep on the shipped demo benchmark (3 seeds, small sizes, CPU-friendly).
demo: install
	PYTHON=$(PY) ./run_finetune_comparison.sh --demo

test: install
	$(PY) -m pytest -q tests

# Speed and memory figures (minutes on 2 CPU cores); see README "Performance".
bench: install
	cd bench && ../$(PY) bench_featurize.py && ../$(PY) bench_finetune.py && ../$(PY) bench_strategies.py && ../$(PY) bench_sweep.py && ../$(PY) bench_scaling.py

clean:
	rm -rf outputs cache .pytest_cache
