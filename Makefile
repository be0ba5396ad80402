# kuiper-plugins: `make run` serves the API, `make test` runs everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export KUIPER_HOME ?= $(CURDIR)/var

.PHONY: venv run test lint clean

$(BIN)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(BIN)/.installed

run: venv
	$(BIN)/gunicorn -c etc/gunicorn.conf.py wsgi:app

lint: venv
	$(BIN)/ruff check kuiper_plugins tests wsgi.py etc/gunicorn.conf.py

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis *.egg-info
