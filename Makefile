# grokstudy: `make quickstart` sets up and runs the quickstart study; `make test` sets up and runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup quickstart demo test test-fast lint format bench gallery papers reference ui clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml cluster/constraints.txt cluster/install.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The Dockerfile's two stages, so CI runs each install step the image runs.
	PYTHON=$(BIN)/python GROKSTUDY_PART=deps cluster/install.sh
	PYTHON=$(BIN)/python GROKSTUDY_PART=package cluster/install.sh
	touch $@

quickstart: setup  ## the main job: a real study ending in phase diagrams and MLflow runs
	$(BIN)/grokstudy run studies/quickstart.yaml

demo: setup  ## one grokking trial, in the terminal
	$(BIN)/grokstudy train --study studies/quickstart.yaml --set optimizer.weight_decay=1 --set data.fraction=0.5

test: setup  ## everything, the integration tests included (what CI runs)
	# Python's faulthandler, not pytest's (which is off again before the interpreter exits), in
	# every process (the test workers too), so a native crash at exit prints every thread's
	# stack: one CI run segfaulted after all passed.
	# Three test processes, one test file each at a time (their module fixtures stay shared): the
	# integration tests mostly wait on process start-ups and servers, and one at a time leave
	# the two cores half idle.
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -p no:faulthandler -n 3 --dist loadfile --no-loadscope-reorder --durations=30

test-fast: setup  ## skip real clusters and servers
	$(BIN)/python -m pytest -m "not integration and not slow"

lint: setup
	$(BIN)/ruff check grokstudy tests bench
	$(BIN)/ruff format --check grokstudy tests bench

format: setup
	$(BIN)/ruff format grokstudy tests bench
	$(BIN)/ruff check --fix grokstudy tests bench

reference: setup  ## docs/study-reference.md and studies/study.schema.json, generated from grokstudy/config.py
	$(BIN)/python -m grokstudy.reference

bench: setup  ## the quick benchmarks (not tests): see bench/README.md
	$(BIN)/python bench/step_efficiency.py
	$(BIN)/python bench/tracking_overhead.py
	$(BIN)/python bench/orchestration_overhead.py

gallery: setup  ## docs/gallery/: the quickstart's figures and report (runs the quickstart first if it has not run)
	[ -f runs/quickstart/trials.parquet ] || $(BIN)/grokstudy run studies/quickstart.yaml
	$(BIN)/grokstudy plot runs/quickstart --out docs/gallery --format png
	[ -f runs/quickstart/report.html ] || $(BIN)/grokstudy report runs/quickstart
	$(BIN)/python docs/gallery/screenshots.py report runs/quickstart docs/gallery/report.png  # needs chromium

papers: setup  ## every studies/papers/*-cpu.yaml reproduction, then docs/reproductions/'s figures and numbers (about 35 minutes on 2 cores)
	for f in studies/papers/*-cpu.yaml; do \
		n=$$(basename $$f .yaml); \
		$(BIN)/grokstudy run $$f --out runs/papers/$$n --format png || exit 1; \
		mkdir -p docs/reproductions/$$n; \
		cp runs/papers/$$n/figures/phase_diagram.png runs/papers/$$n/figures/learning_curves.png docs/reproductions/$$n/; \
		for s in sweep sweep_loss circuit_heatmap; do [ ! -f runs/papers/$$n/figures/$$s.png ] || cp runs/papers/$$n/figures/$$s.png docs/reproductions/$$n/; done; \
	done
	$(BIN)/python studies/papers/summarize.py runs/papers > docs/reproductions/numbers.md

ui: setup  ## browse the quickstart study in the MLflow UI
	$(BIN)/grokstudy ui runs/quickstart

clean:
	rm -rf runs test-artifacts .pytest_cache
