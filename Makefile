# kuiper-plugins: `make run` serves the API, `make test` runs everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export KUIPER_HOME ?= $(CURDIR)/var

# Debian tools the tests and benchmarks drive for real; installed when missing (needs root, as on CI).
TEST_TOOLS := openssl chromium nginx strace wrk unzip eatmydata zsh
# Tools whose Debian package has another name, as tool:package: Go (its encoding/gob and plugin.Open are asked
# by the tests), the arm64 C cross compiler and musl-gcc (plugins tests/test_compat.py refuses by machine and
# by C library), and systemd-analyze (the unit is verified).
TEST_TOOLS_IN := go:golang-go aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu musl-gcc:musl-tools systemd-analyze:systemd

.PHONY: venv run test lint clean system-deps bench fuzz

$(BIN)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(BIN)/.installed

run: venv
	$(BIN)/gunicorn -c etc/gunicorn.conf.py wsgi:app

lint: venv
	$(BIN)/ruff check kuiper_plugins tests bench wsgi.py etc/gunicorn.conf.py contrib/ansible/library

system-deps:
	@missing=""; for tool in $(TEST_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	for pair in $(TEST_TOOLS_IN); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
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
