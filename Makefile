# Everything a fresh machine needs: `make demo` and `make test` install first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, so that no resolver pulls the CUDA wheels
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[dev,peft,notebooks,serve]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/rapidin-index demo

test: install
	$(PY) -m pytest -n 2 --dist loadfile tests

lint: install
	$(VENV)/bin/ruff check rapidin_index cli tests benchmarks
	$(VENV)/bin/ruff format --check rapidin_index cli tests benchmarks

bench: install
	$(PY) benchmarks/build_throughput.py

clean:
	rm -rf $(VENV) .demo .bench .pytest_cache
