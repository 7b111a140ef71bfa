# Two entry points: `make example` (set up, then label the demo scenes on a local embedded Ray)
# and `make test` (set up with test extras, then run the test suite). Both create .venv on first use.
# `make test-fast` runs the tests that start no Ray, subprocess or server and are not slow (a few minutes).
# constraints.txt pins the versions the suite last passed with: installs are reproducible, and pip skips
# the long backtracking through boto3/botocore releases that s3fs's pins otherwise cause.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: setup example test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e '.[test]'
	# Byte-compile once, on every core (about 40 s on 2): where PYTHONDONTWRITEBYTECODE is set, each lgca
	# command and each Ray worker would otherwise compile torch, Ray and pyarrow from source (about 10 s each).
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

# The demo scenes hold one Fashion-MNIST test object each, named by its true class; the committed model knows
# those ten kinds of clothing (examples/fashion/README.md).
example: setup
	$(BIN)/lgca run examples/fashion/scenes --labels examples/fashion/descriptors.json \
		--templates examples/fashion/templates.txt --model examples/fashion/fashion-clip.json \
		--pretrained examples/fashion/fashion-clip.safetensors --output out/example --overwrite
	$(BIN)/python jobs/show_example.py out/example

test: setup
	$(BIN)/python -m pytest -q

# Without the `integration` tests (they start Ray, a subprocess or a server: moto S3, HTTP, Chromium) and the `slow`
# ones. LGCA_FAST_TESTS=1 fails any test that starts one of those unmarked (tests/conftest.py): what passes here
# started none.
test-fast: setup
	LGCA_FAST_TESTS=1 $(BIN)/python -m pytest -q -m "not integration and not slow"

# Lint, format, the package boundaries of ../shared/STYLE.md (import contracts in pyproject.toml), types.
lint: setup
	$(BIN)/ruff check pipeline jobs tests
	$(BIN)/ruff format --check pipeline jobs tests
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: setup
	bash jobs/bench_cpu.sh bench-out

clean:
	rm -rf out .pytest_cache
