"""longrun against llama.cpp on this machine: same model (SmolLM2-135M-Instruct, Q8_0 / q8_0),
same threads, one run. Prints tokens/s of each, their ratio, peak RSS and what the figures mean
in GB/s (decode reads every weight once per token) and GFLOP/s (prefill does 2 x params flops
per token, attention not counted). Speed is printed, never asserted: this is not a test.

    python tools/bench_compare.py --run ./run --model M.bin --llama-bench B --gguf M.gguf [--threads 2]

`make bench-compare` builds llama.cpp from the llama-cpp-python sdist and calls this."""
import argparse
import json
import os
import re
import subprocess
import sys


def run_measured(cmd):
    """(stdout, stderr, peak RSS in MB) of one process, via wait4's rusage."""
    import tempfile
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed ({p.returncode}):\n{stderr[-2000:]}")
    return stdout, stderr, usage.ru_maxrss / 1024


def longrun(args, tests, extra=()):
    out, err, rss = run_measured([args.run, args.model, "-m", "bench", "--json", "-r", str(args.reps),
                                  "--threads", str(args.threads), *tests, *extra])
    weights = float(re.search(r"weights ([\d.]+) MB", err).group(1))
    params = float(re.search(r"([\d.]+)M params", err).group(1)) * 1e6
    rows = {(r["test"], r["depth"]): r["tokens_per_s"] for r in json.loads(out)["results"]}
    return rows, rss, weights, params


def llama(args, prompt, gen, depth, extra=()):
    cmd = [args.llama_bench, "-m", args.gguf, "-t", str(args.threads), "-r", str(args.reps), "-o", "json",
           "-p", str(prompt), "-n", str(gen), "-d", str(depth), *extra]
    out, _, rss = run_measured(cmd)
    rows = {}
    for r in json.loads(out):
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        rows[(test, r.get("n_depth", 0))] = r["avg_ts"]
    return rows, rss


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="./run")
    ap.add_argument("--model", required=True, help="longrun q8_0 model file")
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--gguf", required=True, help="the same model as a Q8_0 GGUF")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--long", default="4096,16384", help="the long prefill lengths")
    args = ap.parse_args()

    longs = [int(x) for x in args.long.split(",")]
    ours, rss_ours, weights_mb, params = longrun(args, ["--bench-pp", ",".join(map(str, [512] + longs)), "--bench-tg", "128"])
    deep, rss_ours_16k, _, _ = longrun(args, ["--bench-pp", "16", "--bench-tg", "64", "--bench-depth", "16384",
                                              "--kv-type", "f16"])
    theirs = {}
    for n in [512] + longs:
        theirs.update(llama(args, n, 0, 0)[0])
    theirs.update(llama(args, 0, 128, 0)[0])
    deep_theirs, rss_theirs_16k = llama(args, 0, 64, 16384, ["-ctk", "f16", "-ctv", "f16"])

    rows = [(f"prefill pp{n}", ours[(f"pp{n}", 0)], theirs[(f"pp{n}", 0)]) for n in [512] + longs]
    rows.append(("decode tg128, depth 0", ours[("tg128", 0)], theirs[("tg128", 0)]))
    rows.append(("decode tg64, depth 16384, f16 KV", deep[("tg64", 16384)], deep_theirs[("tg64", 16384)]))
    print(f"SmolLM2-135M-Instruct q8_0, {args.threads} threads, {args.reps} repetitions; tokens/s\n")
    print("| measure | longrun | llama.cpp | ratio |\n|---|---:|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    print(f"| peak RSS, 16K context (MB) | {rss_ours_16k:.0f} | {rss_theirs_16k:.0f} | {rss_ours_16k / rss_theirs_16k:.2f}x |")
    tg = ours[("tg128", 0)]
    pp = ours[("pp512", 0)]
    print(f"\nlongrun decode reads {weights_mb:.1f} MB of weights per token: {tg * weights_mb / 1e3:.1f} GB/s at tg128 "
          f"(llama.cpp {theirs[('tg128', 0)] * weights_mb / 1e3:.1f} GB/s); prefill pp512 does "
          f"{2 * params * pp / 1e9:.1f} GFLOP/s of matrix products (llama.cpp {2 * params * theirs[('pp512', 0)] / 1e9:.1f})")


if __name__ == "__main__":
    main()
