# The two commands the README tells people to run: `make demo` and `make test`.
PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
CONSTRAINTS := constraints.txt
# the CPU build of torch, on this machine's disk; a CUDA torch already installed is kept instead
TORCH_CPU   := torch==2.13.0

.PHONY: demo test test-bundle test-llamacpp install lock lint docs clean

# Every package but torch comes at the exact version in constraints.txt. A torch already installed for
# $(PYTHON) (a CUDA build on a GPU box) is reused through --system-site-packages and never replaced;
# CI (CI=true) and a machine without torch get a venv of their own with the CPU build, so nothing
# else installed on the machine leaks in.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@if [ ! -x $(PY) ]; then \
	  if [ -z "$$CI" ] && $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "using the torch already installed for $(PYTHON): $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	@touch $(STAMP)
	@echo "installed tunedeck into $(VENV) (pinned by $(CONSTRAINTS))"

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunedeck demo $(DEMO_ARGS)

# Two workers, one core and one torch thread each (tests/conftest.py); a test file stays on one worker.
# Most tests wait on a process they started (a run, a service, the app in tmux): one worker alone
# left a core idle most of the time.
WORKERS     ?= 2

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -n $(WORKERS) --dist loadfile $(PYTEST_ARGS)

# The deploy bundle started from its own folder in a fresh venv (over a minute of installing; CI runs it).
test-bundle: $(STAMP)
	$(PY) -m pytest -q -m venv tests/test_export.py

# llama.cpp itself reading an exported GGUF: the same tokens and the same greedy answer as tunedeck.
# llama-cpp-python builds llama.cpp from source (about 4 minutes on 2 cores, once per venv; CI runs it).
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF

test-llamacpp: $(STAMP)
	@$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[llamacpp]'
	TUNEDECK_REQUIRE_LLAMA_CPP=1 $(PY) -m pytest -q tests/test_export.py -k llama_cpp

# Refresh the pins: the newest releases pyproject.toml's ranges allow, in a venv of their own, written
# to constraints.txt; then the suite runs on them (a failure leaves the new pins for you to look at).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(TORCH_CPU)
	CMAKE_ARGS="$(LLAMA_CMAKE)" .venv-lock/bin/python -m pip install -q -e '.[test,llamacpp]'
	{ echo "# Exact versions the suite passed with (make lock rewrites this file; torch is installed apart)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -E '^(torch|nvidia-|triton)=='; } > $(CONSTRAINTS)
	rm -rf .venv-lock
	$(MAKE) test

lint: $(STAMP)
	$(VENV)/bin/ruff check engine tui tests bench
	$(VENV)/bin/lint-imports

# The recipe reference from the schema, and one picture per screen from the snapshot tests' SVGs.
docs: $(STAMP)
	$(PY) -m engine.recipe.reference > docs/recipes.md
	@mkdir -p docs/images
	@set -e; cd tests/__snapshots__/test_snapshots; \
	  cp 'test_screen_snapshot[1-120x36].svg' ../../../docs/images/configs.svg; \
	  cp 'test_editor_snapshot[120x36].svg' ../../../docs/images/editor.svg; \
	  cp 'test_screen_snapshot[3-120x36].svg' ../../../docs/images/runs.svg; \
	  cp 'test_screen_snapshot[4-120x36].svg' ../../../docs/images/chat.svg; \
	  cp 'test_screen_snapshot[5-120x36].svg' ../../../docs/images/files.svg; \
	  cp 'test_screen_snapshot[6-120x36].svg' ../../../docs/images/data.svg; \
	  cp 'test_compare_snapshot[120x36].svg' ../../../docs/images/compare.svg; \
	  cp 'test_gpus_snapshot[120x36].svg' ../../../docs/images/gpus.svg
	@echo "docs/recipes.md and docs/images/ rewritten"

clean:
	rm -rf $(VENV) .venv-lock workspace work_dirs .pytest_cache
