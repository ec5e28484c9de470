# Two commands do everything on a fresh machine: `make demo` and `make test`.
# VENV can point outside the clone (CI keeps it in ~/.cache/genval-aug/venv).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.genval-aug-installed
STAMP_KEY := $(shell cat pyproject.toml | sha1sum | cut -c1-16)-$(shell pwd | sha1sum | cut -c1-8)
PYTEST_ARGS ?=
# the oldest Ultralytics pyproject.toml allows (ultralytics>=8.3): `make test-compat` runs the Ultralytics
# tests against it, installed beside the environment (no other package changes)
ULTRALYTICS_MIN := 8.3.0
COMPAT := $(VENV)/compat/ultralytics-$(ULTRALYTICS_MIN)

.PHONY: install demo test test-compat lint bench clean

$(PY):
	@$(PYTHON) -m venv $(VENV)

install: $(PY)
	@if [ "$$(cat $(STAMP) 2>/dev/null)" != "$(STAMP_KEY)" ]; then \
	  echo "genval-aug: installing into $(VENV) (torch 2.14.1 / torchvision 0.29.1 pinned here; first run takes ~2 min)"; \
	  $(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored: it is neither" || true; \
	  $(PY) -m pip install -q --disable-pip-version-check -e '.[all,dev]' torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored: it is neither" || true; \
	  $(PY) -c "import genval_aug, torch, torchvision, cv2, lmdb" || exit 1; \
	  echo "$(STAMP_KEY)" > $(STAMP); \
	fi

demo: install
	@$(PY) -m genval_aug.demo

test: install
	@$(PY) -m pytest -q $(PYTEST_ARGS)

test-compat: install
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --upgrade --target $(COMPAT) \
		ultralytics==$(ULTRALYTICS_MIN) 2>&1 | grep -v "is ignored: it is neither" || true
	@PYTHONPATH=$(abspath $(COMPAT)) $(PY) -c "import ultralytics as u; assert u.__version__ == '$(ULTRALYTICS_MIN)', u.__version__"
	@PYTHONPATH=$(abspath $(COMPAT)) $(PY) -m pytest -q -p no:cacheprovider tests/test_ultralytics.py

lint: install
	@$(VENV)/bin/ruff check genval_aug tests benchmarks examples

bench: install
	@# generate.py: tiny random models (the real run needs SDXL + LayerDiffuse weights and a GPU)
	@for b in benchmarks/*.py; do echo "== $$b"; case $$b in *generate.py) a=--tiny;; *) a=;; esac; \
		$(PY) $$b $$a || exit 1; done

clean:
	rm -rf runs .pytest_cache
