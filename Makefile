# make test: create .venv if missing, install, run the whole test suite (also on the oldest
#            supported transformers release, in .venv-tf-min).
# make demo: train gates on the embedded tiny model and sweep the five policies over budgets.
PYTHON ?= python3
VENV ?= .venv
VENV_MIN ?= .venv-tf-min
# The CPU wheel of torch used here and in CI; on a GPU machine pass your CUDA build, e.g.
# make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# The oldest transformers release in the supported range (pyproject.toml).
TRANSFORMERS_MIN ?= transformers==5.2.0
# Tests that exercise the transformers integration, rerun on the oldest supported release.
INTEGRATION_TESTS ?= tests/test_compat.py tests/test_eviction_masked_reference.py tests/test_eviction_generate.py \
	tests/test_policies.py tests/test_chunked_prefill.py

TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

.PHONY: install test test-main test-min demo clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

$(VENV_MIN)/.installed: pyproject.toml
	test -d $(VENV_MIN) || $(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/pip install -q --upgrade pip
	$(VENV_MIN)/bin/pip install -q $(TORCH_SPEC)
	$(VENV_MIN)/bin/pip install -q "$(TRANSFORMERS_MIN)" -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: test-main test-min

test-main: $(VENV)/.installed
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q

test-min: $(VENV_MIN)/.installed
	$(TEST_ENV) $(VENV_MIN)/bin/python -m pytest -q $(INTEGRATION_TESTS)

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(VENV)/bin/python scripts/demo.py

clean:
	rm -rf outputs multirun .pytest_cache
