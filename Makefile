# Two commands set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test demo docs docs-into bench clean chromium

# What the HTML docs cover (pdoc, from the docstrings).
# adaptation/__init__ has an __all__, which hides its submodules from pdoc: list them.
DOC_MODULES := guides extract train similarity demo toolkit featuresExtractor adaptation retrieval synthetic \
	$(sort $(patsubst %.py,%,$(subst /,.,$(wildcard adaptation/[a-z]*.py))))
# COLUMNS fixes the width of the argparse help in the scripts' pages (.ci/pdoc shows it), whatever the terminal.
PDOC = PYTHONHASHSEED=0 COLUMNS=100 $(BIN)/python -m pdoc -t .ci/pdoc --docformat google --footer-text "featuresExtractor + adaptation + retrieval" -o

# The venv is rebuilt only when a requirements file or pyproject.toml changes; the project itself is
# installed editable, so `featuresExtractor`, `adaptation` and `retrieval` import from any directory.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(STAMP)

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -rs tests

# The search page's browser test (tests/test_serve.py) drives Debian's chromium through Playwright; it is
# installed here where it is missing and we may (root, apt-get). Elsewhere that test is skipped, saying why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	    || echo "could not install chromium: the browser test will be skipped"; \
	  else echo "chromium is missing and cannot be installed here (needs root and apt-get): the browser test will be skipped"; fi; }

# The whole pipeline on embedded synthetic pairs, offline.
demo: $(STAMP)
	$(BIN)/python demo.py --out demo_out

# Regenerate docs/ from the docstrings (tests/test_docs.py fails when it is stale).
docs: $(STAMP)
	rm -rf docs.tmp && $(MAKE) --no-print-directory docs-into OUT=docs.tmp && rm -rf docs && mv docs.tmp docs

docs-into:
	$(PDOC) $(OUT) $(DOC_MODULES)

bench: $(STAMP)
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/objectives.py
	$(BIN)/python bench/index.py --threads 1
	$(BIN)/python bench/train_scale.py
	$(BIN)/python bench/onnx.py

clean:
	rm -rf $(VENV) .pytest_cache demo_out
