# kuiper-plugins: `make run` serves the API, `make test` runs everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export KUIPER_HOME ?= $(CURDIR)/var
# Where `make install` links the command-line client.
PREFIX ?= /usr/local

# Debian tools the tests and benchmarks drive for real; installed when missing (needs root, as on CI).
TEST_TOOLS := openssl chromium nginx strace wrk unzip eatmydata zsh
# Tools whose Debian package has another name, as tool:package: Go (its encoding/gob and plugin.Open are asked
# by the tests), the arm64 C cross compiler and musl-gcc (plugins tests/test_compat.py refuses by machine and
# by C library), and systemd-analyze (the unit is verified).
TEST_TOOLS_IN := go:golang-go aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu musl-gcc:musl-tools systemd-analyze:systemd

# apt and dpkg's locks: while another apt holds one, system-deps waits (saying who holds it), at most
# APT_LOCK_TIMEOUT seconds, instead of failing at once.
APT_GET ?= apt-get
APT_LOCKS ?= /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock /var/cache/apt/archives/lock
APT_LOCK_TIMEOUT ?= 600

.PHONY: venv test-venv run install test lint clean system-deps bench fuzz

# What serving needs (the `run` extra: gunicorn), for `make run` and the systemd unit's `make venv`.
$(BIN)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[run]'
	touch $@

# The same plus what the tests, the linter and the benchmarks drive (the `test` extra).
$(BIN)/.installed-test: $(BIN)/.installed setup.cfg setup.py
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[run,test]'
	touch $@

venv: $(BIN)/.installed

test-venv: $(BIN)/.installed-test

run: venv
	$(BIN)/gunicorn -c etc/gunicorn.conf.py wsgi:app

install: venv
	install -d $(PREFIX)/bin
	ln -sf $(CURDIR)/$(BIN)/kuiper-plugins $(PREFIX)/bin/kuiper-plugins
	@echo "kuiper-plugins is $(PREFIX)/bin/kuiper-plugins (a link into $(CURDIR)/$(BIN))"

lint: test-venv
	$(BIN)/ruff check kuiper_plugins tests bench contrib/wait_for_apt.py wsgi.py etc/gunicorn.conf.py contrib/ansible/library

system-deps:
	@missing=""; for tool in $(TEST_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	for pair in $(TEST_TOOLS_IN); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing with $(APT_GET) (Debian packages the tests drive; this needs root)"; \
		$(PYTHON) contrib/wait_for_apt.py --timeout $(APT_LOCK_TIMEOUT) $(APT_LOCKS) && \
		$(APT_GET) -o DPkg::Lock::Timeout=$(APT_LOCK_TIMEOUT) update -qq && \
		DEBIAN_FRONTEND=noninteractive $(APT_GET) -o DPkg::Lock::Timeout=$(APT_LOCK_TIMEOUT) install -y -qq $$missing; \
	fi

test: lint system-deps
	$(BIN)/pytest

bench: test-venv system-deps
	$(BIN)/python bench/run.py

fuzz: test-venv
	$(BIN)/python tests/fuzz_api.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis *.egg-info
