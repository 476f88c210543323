# Every target installs what it needs into .venv, from a fresh clone, with only python3 and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned to the CPU build that lies on this machine's disk: an open range pulls a
# CUDA build of several GB.
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-slow install check bench info docs docs-screenshots clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[test,docs,demo,jax,triton,transformers,trl,tensorflow,keras]' $(TORCH_PIN)
	touch $@

# The demo's exact column needs mpmath; its peer columns show each framework that is installed.
$(VENV)/.demo-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[demo,jax,transformers]' $(TORCH_PIN)
	touch $@

# The site's API pages are read from the sources (griffe), so the docs need no framework.
$(VENV)/.docs-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[docs]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.demo-installed
	$(BIN)/python -m logitkit demo
	$(BIN)/python -m logitkit.transformers.demo

# One pytest worker per core (pytest-xdist); loadscope keeps a module's tests, and so its
# module-scoped fixtures (spawned process groups, JAX children), on one worker.
# The few tests marked slow (fresh-process compiles, spawned gloo ranks, timed bench runs) run
# in test-slow; CI (.ci/run) runs test, then test-slow, so every test still runs there.
TEST_JOBS ?= 2
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist loadscope
test: $(VENV)/.kernels-warm
	$(PYTEST) -m "not slow"

test-slow: $(VENV)/.kernels-warm
	$(PYTEST) -m slow

# numba compiles the CPU kernels on their first call and caches them on disk (cache=True, in
# src/logitkit/**/__pycache__, checked against the source files): compile them once per checkout
# (and again after the kernels' sources change), in two processes at once, as a user's first
# calls would, instead of in each test worker.
KERNEL_SOURCES := $(wildcard src/logitkit/kernels/cpu/*.py) src/logitkit/torch/_entry.py src/logitkit/jax/_ffi.py
$(VENV)/.kernels-warm: $(VENV)/.test-installed tools/warm_kernels.py $(KERNEL_SOURCES)
	$(BIN)/python tools/warm_kernels.py numpy & pid=$$!; $(BIN)/python tools/warm_kernels.py torch jax; st=$$?; \
	  wait $$pid && [ $$st = 0 ]
	touch $@

check: $(VENV)/.demo-installed
	$(BIN)/python -m logitkit check

bench: $(VENV)/.test-installed
	$(BIN)/python -m logitkit bench

info: $(VENV)/.installed
	$(BIN)/python -m logitkit info

# Builds the documentation site into site/; any warning (a broken link, a bad docstring) fails.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# What the built site looks like in a real browser (Debian: apt-get install chromium).
docs-screenshots: docs
	for page in index api/logitkit; do \
	  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1500 \
	    --screenshot=docs/assets/screenshots/$$(echo $$page | tr / -).png file://$(CURDIR)/site/$$page.html; \
	done

clean:
	rm -rf $(VENV) build site src/*.egg-info
