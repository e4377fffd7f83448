# Two commands do everything on a fresh machine: `make bench` and `make test`.
# Both install first: torch only when it is missing (never replacing yours), then fastbert
# in place with its test extras, building the C++ (and, with a GPU, CUDA) extension.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test bench clean
.installed: setup.py csrc $(wildcard csrc/*)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install setuptools wheel ninja pybind11
	$(PYTHON) -m pip install --no-build-isolation -e ".[test]"
	touch .installed

install: .installed

test: .installed
	$(PYTHON) -m pytest tests -q

bench: .installed
	$(PYTHON) -m fastbert bench

clean:
	rm -rf build *.egg-info fastbert/_C*.so .installed
