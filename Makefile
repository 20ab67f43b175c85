# The two commands of the README. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/fashion_mnist
PYTEST_ARGS ?=

.PHONY: demo test venv data clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,experiments]'
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST (dataset-fashion-mnist) and the python_docs text corpus (python3-doc) from Debian when missing and
# we may install them; else main prints where it looked and how to install them.
APT_DATA := $(if $(or $(TTQ_DATA_DIR),$(wildcard /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz)),,dataset-fashion-mnist) \
            $(if $(or $(TTQ_TEXT_DIR),$(wildcard /usr/share/doc/python3/html/_sources/contents.rst.txt)),,python3-doc)
data:
	@if [ -n "$(strip $(APT_DATA))" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq $(APT_DATA)) >/dev/null || echo "apt-get could not install $(APT_DATA)"; \
	  else echo "missing: run 'sudo apt-get install $(strip $(APT_DATA))' (or set TTQ_DATA_DIR / TTQ_TEXT_DIR)"; fi; \
	fi

demo: venv data
	$(PY) -m ttq_jax.main --config configs/fashion_mnist.py --workdir $(WORKDIR)
	$(PY) -m ttq_jax.main --config configs/fashion_mnist.py --workdir $(WORKDIR) --mode eval

# Two pytest-xdist workers, one test file each at a time (module fixtures run once), files in the order of
# tests/conftest.py's LONGEST_FIRST (--no-loadscope-reorder: xdist would otherwise start the files with the most
# tests first and leave long files of few tests to the end). Three workers measured slower on 2 cores.
test: venv data
	$(PY) -m pytest -q --durations=15 -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdirs
