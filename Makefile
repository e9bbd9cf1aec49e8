# The two commands a new user needs:
#   make demo   set everything up, then build a tiny DeepSeek model, serve it on a real Triton and ask it something
#   make test   set everything up, then run the test suite (what CI runs)
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
DEMO_PROMPT ?= The capital of France is
# make test runs the suite on this many pytest-xdist workers, each taking whole test files so a file's module
# fixtures (a built engine, a running Triton) stay in one process: the CPUs this machine lets us use (its affinity,
# capped by a container's CPU quota, as the engines count them), at most 4, since the suite's servers are CPU-heavy.
# 0 runs the suite in pytest's own process. Expanded when the recipe runs, after setup has made the venv.
TEST_WORKERS ?= $(shell $(BIN)/python -c "from deepseek_model_repository.serving.runners import available_cpus; print(min(4, available_cpus()[0]))")

.PHONY: setup demo test test-fast bench lint clean

setup:
	@scripts/bootstrap.sh

demo: setup
	$(BIN)/deepseek-operator local up
	$(BIN)/deepseek-operator local generate "$(DEMO_PROMPT)" --max-tokens 24
	$(BIN)/deepseek-operator local generate "$(DEMO_PROMPT)" --max-tokens 24 --stream
	$(BIN)/deepseek-operator local down

test: setup
	$(BIN)/python -m pytest -ra --numprocesses $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(BIN)/python -m pytest -ra tests/unit

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/build/run.py
	$(BIN)/python bench/batching/run.py
	$(BIN)/python bench/autoscaling/run.py
	$(BIN)/python bench/operator/run.py
	$(BIN)/python bench/serving/run.py
	$(BIN)/python bench/serving/cache_write.py
	$(BIN)/python bench/serving/chunked_prefill.py

clean:
	rm -rf $(VENV) .tools .pytest_cache
