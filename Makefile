# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install, pretrain a small MAE on the embedded synthetic set, probe AFF vs NFF
#   make test   - same venv, run the test suite
#   make lint   - ruff format/lint and the import-layer contract
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DEMO_DIR ?= demo_out

.PHONY: demo test test-slurm lint format bench clean venv dino-demo study-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,torch]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m afm_jax.main --config configs/demo.py --workdir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests --ignore=tests/cluster

# The launchers on a throw-away local SLURM (root, `apt-get install -y slurm-wlm munge`; .ci/run does both).
# AFM_REQUIRE_SLURM=1: a missing SLURM fails the target instead of skipping the tests.
test-slurm: $(STAMP)
	AFM_REQUIRE_SLURM=1 $(PY) -m pytest -q -p no:xdist -rs --durations=0 tests/cluster

# ruff (format + lint) and the layer contract (import-linter, pyproject.toml [tool.importlinter]).
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

dino-demo: $(STAMP)
	$(PY) -m afm_jax.main --config configs/dino_demo.py --workdir dino_demo_out

study-demo: $(STAMP)
	$(PY) tools/study.py configs/studies/demo.py

bench: $(STAMP)
	$(PY) bench/train_step.py --config configs/mae_vits.py --compare-timm
	$(PY) bench/train_step.py --config configs/dino_vits16.py --compare-timm
	$(PY) bench/input_pipeline.py
	$(PY) bench/preprocess.py
	$(PY) bench/curate.py

clean:
	rm -rf $(DEMO_DIR) dino_demo_out study_out
