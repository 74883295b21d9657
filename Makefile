# `make test` and `make demo` do all set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# `make test` adds the optional NATTEN accelerator to the same environment, so that the natten backend is
# checked against the reference tester in the same run (a pure-Python package on CPU: seconds to build)
NATTEN_STAMP := $(VENV)/.natten-stamp

# the reference stack for benchmarks/ (--reference-python): transformers 4.46.3 with NATTEN 0.17.5's CPU
# kernels, compiled from source against the pinned torch (tens of minutes on 2 cores); not needed by `make test`
REFERENCE_VENV ?= .venv-reference
REFERENCE_STAMP := $(REFERENCE_VENV)/.installed-stamp

.PHONY: test demo venv reference-venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP) $(NATTEN_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

$(NATTEN_STAMP): $(STAMP)
	# NATTEN's source package imports torch while building: build it against the pinned torch installed above
	$(PY) -m pip install --quiet --no-build-isolation -c constraints.txt natten
	touch $(NATTEN_STAMP)

reference-venv: $(REFERENCE_STAMP)

$(REFERENCE_STAMP): constraints.txt
	python3 -m venv $(REFERENCE_VENV)
	$(REFERENCE_VENV)/bin/python -m pip install --quiet -c constraints.txt torch numpy pillow
	# transformers 4.x is outside constraints.txt (which pins this package's 5.x); it does not pull torch
	$(REFERENCE_VENV)/bin/python -m pip install --quiet transformers==4.46.3 cmake
	$(REFERENCE_VENV)/bin/python -m pip install --quiet --no-build-isolation natten==0.17.5
	touch $(REFERENCE_STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) $(REFERENCE_VENV) build src/*.egg-info
