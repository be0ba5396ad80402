# kuiper-plugins: `make run` serves the API, `make test` runs everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export KUIPER_HOME ?= $(CURDIR)/var

# Debian tools the tests and benchmarks drive for real; installed when missing (needs root, as on CI).
TEST_TOOLS := openssl chromium nginx strace wrk unzip eatmydata
# Go's own encoding/gob checks our bytes (tests/go/gobcheck); the command is go, Debian's package golang-go.
GO_PACKAGE := golang-go
# The arm64 C cross compiler cgo needs to build the arm64 plugin tests/test_compat.py refuses by machine.
ARM64_CC_PACKAGE := gcc-aarch64-linux-gnu
# musl-gcc links the musl plugin tests/test_compat.py refuses by C library.
MUSL_PACKAGE := musl-tools

.PHONY: venv run test lint clean system-deps bench fuzz

$(BIN)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(BIN)/.installed

run: venv
	$(BIN)/gunicorn -c etc/gunicorn.conf.py wsgi:app

lint: venv
	$(BIN)/ruff check kuiper_plugins tests bench wsgi.py etc/gunicorn.conf.py

system-deps:
	@missing=""; for tool in $(TEST_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	command -v go >/dev/null || missing="$$missing $(GO_PACKAGE)"; \
	command -v aarch64-linux-gnu-gcc >/dev/null || missing="$$missing $(ARM64_CC_PACKAGE)"; \
	command -v musl-gcc >/dev/null || missing="$$missing $(MUSL_PACKAGE)"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

test: lint system-deps
	$(BIN)/pytest

bench: venv system-deps
	$(BIN)/python bench/run.py

fuzz: venv
	$(BIN)/python tests/fuzz_api.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis *.egg-info
