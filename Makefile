# Two commands on a fresh machine: `make demo` and `make test`.
# Without an active virtual environment both create .venv, install torch==2.13.0 (the CPU wheel
# on these machines; a bare torch requirement would pull a multi-GB CUDA build) and the project.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif
STAMP := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(VENV))/.tram_dist_installed

.PHONY: setup test demo clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	@if [ -z "$(VIRTUAL_ENV)" ] && [ ! -x $(VENV)/bin/python ]; then $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m tram_dist.demo

clean:
	rm -rf $(VENV) build *.egg-info
