# Two commands do all the set-up on a fresh clone:
#   make repro   run the whole pipeline (dvc repro) on the embedded sample data
#   make test    lint (ruff) and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
# dvc.yaml runs `python -m stages.<name>`: that must be the venv's python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONHASHSEED := 0

.PHONY: repro test lint install lock plots exps revalidate sweep bench clean

install: $(STAMP)

# requirements.lock pins every package (torch 2.14.1 / torchvision 0.29.1 included);
# the project itself goes in editable, without re-resolving its dependencies
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

repro: $(STAMP)
	$(VENV)/bin/dvc repro

# CI for a commit made on the real data: pull the committed models and data from the DVC remote, re-run
# evaluate only, compare with the committed metrics and with the base's (default: the merge-base with
# origin/main; BASE=REV names another)
revalidate: $(STAMP)
	$(PY) -m stages.revalidate $(if $(BASE),--base $(BASE)) $(if $(REMOTE),--remote $(REMOTE))

# the click filter's threshold sweep (README's figure): reports/sweep/filter_sweep.{csv,md,png}, from the
# sample's data/raw and data/images (after make repro)
sweep: $(STAMP)
	$(PY) -m stages.filter_clicks data/raw data/images --sweep reports/sweep

# dvc plots show as a page that works offline (Vega inlined): dvc_plots/index.html
plots: $(STAMP)
	$(PY) scripts/plots_offline.py

# dvc exp show without the columns that are hashes of code files and data folders (every stage dep
# is a column); metrics and params stay. Add ARGS=--only-changed to see what differs between experiments
exps: $(STAMP)
	$(VENV)/bin/dvc exp show --no-pager --drop '^(stages|data|models)/[^:]*$$' $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

# re-resolve the lock from pyproject.toml in a scratch venv (torch pinned as for the sample run)
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e '.[test,timm,plots,s3,offline-imagenet]'
	{ sed -n '1,3p' requirements.lock; .lock-venv/bin/pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv

clean:
	rm -rf $(VENV)
