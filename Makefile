# make test: create .venv if missing, install, run the whole test suite (also on the oldest
#            supported transformers release, in .venv-tf-min) and the kvpress parity check.
# make parity: compare the kept tokens of our policies with NVIDIA kvpress's presses (.venv-kvpress).
# make demo: train gates on the embedded tiny model and sweep the five policies over budgets.
# make bench: decode speed and memory of every policy (scripts/benchmark.py).
PYTHON ?= python3
VENV ?= .venv
VENV_MIN ?= .venv-tf-min
VENV_KVPRESS ?= .venv-kvpress
# The CPU wheel of torch used here and in CI; on a GPU machine pass your CUDA build, e.g.
# make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# The oldest transformers release in the supported range (pyproject.toml).
TRANSFORMERS_MIN ?= transformers==5.2.0
# The independent implementation the parity check compares against. kvpress 0.5.5 requires
# transformers <5.3, so its venv uses TRANSFORMERS_MIN.
KVPRESS_SPEC ?= kvpress==0.5.5
# Tests that exercise the transformers integration, rerun on the oldest supported release.
INTEGRATION_TESTS ?= tests/test_compat.py tests/test_eviction_masked_reference.py tests/test_eviction_generate.py \
	tests/test_policies.py tests/test_policies_extra.py tests/test_chunked_prefill.py
# Collected only by `make parity` (pyproject.toml's addopts ignore it in the other runs).
PARITY_TESTS ?= tests/test_kvpress_parity.py

TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

.PHONY: install test test-main test-min parity demo bench clean

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

# kvpress's own dependencies come from its pins; trimkv needs nothing beyond torch and
# transformers for the cache and the policies, so it is installed without its dependencies.
$(VENV_KVPRESS)/.installed: pyproject.toml
	test -d $(VENV_KVPRESS) || $(PYTHON) -m venv $(VENV_KVPRESS)
	$(VENV_KVPRESS)/bin/pip install -q --upgrade pip
	$(VENV_KVPRESS)/bin/pip install -q $(TORCH_SPEC)
	$(VENV_KVPRESS)/bin/pip install -q "$(KVPRESS_SPEC)" "$(TRANSFORMERS_MIN)" "pytest>=8"
	$(VENV_KVPRESS)/bin/pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

test: test-main test-min parity

test-main: $(VENV)/.installed
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q

test-min: $(VENV_MIN)/.installed
	$(TEST_ENV) $(VENV_MIN)/bin/python -m pytest -q $(INTEGRATION_TESTS)

# -o addopts= drops the --ignore of the parity tests; the junit check fails the target when a
# parity test was skipped or none ran, so a broken venv cannot pass silently.
parity: $(VENV_KVPRESS)/.installed
	$(TEST_ENV) $(VENV_KVPRESS)/bin/python -m pytest -q -p no:cacheprovider -o addopts= -ra \
		--junitxml=$(VENV_KVPRESS)/parity-junit.xml $(PARITY_TESTS)
	$(VENV_KVPRESS)/bin/python -c "import sys, xml.etree.ElementTree as ET; \
	suite = ET.parse('$(VENV_KVPRESS)/parity-junit.xml').getroot().find('testsuite'); \
	total, skipped = int(suite.get('tests')), int(suite.get('skipped')); \
	sys.exit(f'parity: {skipped} of {total} tests skipped; every parity test must run' if skipped or not total else 0)"

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(VENV)/bin/python scripts/demo.py

# Decode speed and memory of every policy (docs/benchmarks.md); pass options with BENCH_ARGS.
bench: $(VENV)/.installed
	$(VENV)/bin/python scripts/benchmark.py $(BENCH_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
