PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo/demo_ec50_scaffold.json
# The real checkpoint when it is in place, otherwise a seeded random-init encoder (labelled as such).
DEMO_WEIGHTS := $(if $(wildcard weights/mol_pre_no_h_220816.pt),weights/mol_pre_no_h_220816.pt,random)

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: install
	$(PY) main.py --mode train --dataset demo_ec50_scaffold --data_file $(DEMO_DATA) \
		--unimol_weights $(DEMO_WEIGHTS) --train_size 500 --val_size 200 --test_size 300 \
		--epochs 100 --output_dir outputs/demo_ec50_scaffold/frozen_seed42 --overwrite

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf outputs cache .pytest_cache
