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
# the oldest versions pyproject.toml allows for the other extras and core packages whose wheels work here, with
# the oldest tokenizers / huggingface_hub / httpcore those accept; `make test-compat` runs the tests of each
# set against it, installed beside the environment in $(VENV)/compat/<name> (nothing else changes)
GEN_MIN := transformers==4.45.2 tokenizers==0.20.3 huggingface_hub==0.34.0 diffusers==0.35.2 \
	accelerate==0.30.0 safetensors==0.4.1
AGENTS_MIN := transformers==4.49.0 tokenizers==0.21.1 huggingface_hub==0.26.5 httpx==0.25.0 httpcore==0.18.0
CORE_MIN := lmdb==1.4.1 cramjam==2.7.0 pillow==9.2.0 pyyaml==6.0 tqdm==4.60.0 albumentations==2.0.7 \
	pycocotools==2.0.8
# $(call compat,<name>,<pinned packages>,<test files>): install the set, check it is what gets imported, test
define compat
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: --upgrade \
		--target $(VENV)/compat/$(1) $(2) 2>&1 | grep -v "is ignored: it is neither" || true
	@PYTHONPATH=$(abspath $(VENV)/compat/$(1)) $(PY) -c "import sys, importlib.metadata as m; \
		bad = [p for p in sys.argv[1:] if m.version(p.split('==')[0]) != p.split('==')[1]]; \
		sys.exit(f'compat $(1): not installed as pinned: {bad}' if bad else 0)" $(2)
	@echo "== compat $(1): $(2)"
	@PYTHONPATH=$(abspath $(VENV)/compat/$(1)) $(PY) -m pytest -q -p no:cacheprovider $(3)
endef

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
	$(call compat,gen-min,$(GEN_MIN),tests/test_layerdiffusion.py)
	$(call compat,agents-min,$(AGENTS_MIN),tests/test_agents_backends.py tests/test_agents_validator.py \
		tests/test_agents_prompt.py tests/test_agents_optimize.py)
	$(call compat,core-min,$(CORE_MIN),tests/test_bank.py tests/test_bank_cache.py tests/test_build.py \
		tests/test_datasets.py tests/test_albumentations.py tests/test_harvest.py)

lint: install
	@$(VENV)/bin/ruff check genval_aug tests benchmarks examples

bench: install
	@# generate.py: tiny random models (the real run needs SDXL + LayerDiffuse weights and a GPU)
	@for b in benchmarks/*.py; do echo "== $$b"; case $$b in *generate.py) a=--tiny;; *) a=;; esac; \
		$(PY) $$b $$a || exit 1; done

clean:
	rm -rf runs .pytest_cache
