"""longrun against llama.cpp on this machine: the same q8_0 model in each engine's format, the
same threads, one run. Prints tokens/s of each (mean ± sd of the repetitions), their ratio, peak
RSS and what the figures mean
in GB/s (decode reads every weight once per token) and GFLOP/s (prefill does 2 x params flops
per prefill token over the layers' matrices, attention not counted). Speed is printed, never
asserted: this is not a test.

    python tools/bench_compare.py --run ./run --model M.bin --llama-bench B --gguf M.gguf
        [--name NAME] [--threads 2] [--reps 3] [--long-reps 3] [--long 4096,16384] [--depth 16384]

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
    # the matrices a prefill token passes through: every parameter but the embedding table (the
    # classifier runs on the last token only)
    vocab, dim = int(re.search(r"vocab (\d+)", err).group(1)), int(re.search(r"dim (\d+)", err).group(1))
    params = float(re.search(r"([\d.]+)M params", err).group(1)) * 1e6 - vocab * dim
    rows = {(r["test"], r["depth"]): (r["tokens_per_s"], r["sd"]) for r in json.loads(out)["results"]}
    return rows, rss, weights, params


def llama(args, prompt, gen, depth, extra=()):
    cmd = [args.llama_bench, "-m", args.gguf, "-t", str(args.threads), "-r", str(args.reps), "-o", "json",
           "-p", str(prompt), "-n", str(gen), "-d", str(depth), *extra]
    out, _, rss = run_measured(cmd)
    rows = {}
    for r in json.loads(out):
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        rows[(test, r.get("n_depth", 0))] = (r["avg_ts"], r["stddev_ts"])
    return rows, rss


def peaks(threads):
    """(float GFLOP/s, int16 pair G multiply-adds/s, read GB/s) of this machine, by tools/peaks.c."""
    here = os.path.dirname(os.path.abspath(__file__))
    exe = os.path.join(here, "..", "build", "peaks")
    os.makedirs(os.path.dirname(exe), exist_ok=True)
    subprocess.run([os.environ.get("CC", "cc"), "-O3", "-march=native", "-fopenmp", "-o", exe,
                    os.path.join(here, "peaks.c")], check=True)
    out = subprocess.run([exe], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS=str(threads))).stdout
    print(out.strip())
    flops, madds, read = (float(x) for x in re.findall(r"([\d.]+) (?:GFLOP/s|G multiply|GB/s)", out))
    return flops, madds, read


def cpu_line():
    """The CPU's model name and the SIMD flags that choose longrun's kernels."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "CPU: unknown"
    name = re.search(r"model name\s*:\s*(.*)", info)
    flags = re.search(r"flags\s*:\s*(.*)", info)
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni")
    have = [f for f in wanted if flags and f in flags.group(1).split()]
    return f"CPU: {name.group(1) if name else 'unknown'}; flags: {' '.join(have) or 'none of ' + ' '.join(wanted)}"


def cell(figure):
    mean, sd = figure
    return f"{mean:.1f} ± {sd:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="./run")
    ap.add_argument("--model", required=True, help="longrun q8_0 model file")
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--gguf", required=True, help="the same model as a Q8_0 GGUF")
    ap.add_argument("--name", default="SmolLM2-135M-Instruct", help="the model's name in the table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of pp512 and tg128")
    ap.add_argument("--long-reps", type=int, default=3, help="repetitions of the long prefills and the deep decode")
    ap.add_argument("--long", default="4096,16384", help="the long prefill lengths")
    ap.add_argument("--depth", type=int, default=16384, help="the deep decode's depth (f16 KV)")
    args = ap.parse_args()

    # The engines take turns measure by measure, so that a slow spell of a shared machine falls
    # on both rather than on whichever ran second.
    longs = [int(x) for x in args.long.split(",")]
    rows, weights_mb, params = [], 0, 0
    for n in [512] + longs + ["tg"]:
        reps = args.reps if n in (512, "tg") else args.long_reps
        a = argparse.Namespace(**{**vars(args), "reps": reps})
        if n == "tg":
            ours, _, weights_mb, params = longrun(a, ["--bench-pp", "16", "--bench-tg", "128"])
            theirs, _ = llama(a, 0, 128, 0)
            rows.append(("decode tg128, depth 0", ours[("tg128", 0)], theirs[("tg128", 0)]))
        else:
            ours, _, weights_mb, params = longrun(a, ["--bench-pp", str(n), "--bench-tg", "1"])
            theirs, _ = llama(a, n, 0, 0)
            rows.append((f"prefill pp{n}", ours[(f"pp{n}", 0)], theirs[(f"pp{n}", 0)]))
    a = argparse.Namespace(**{**vars(args), "reps": args.long_reps})
    deep, rss_ours, _, _ = longrun(a, ["--bench-pp", "16", "--bench-tg", "64", "--bench-depth", str(args.depth),
                                       "--kv-type", "f16"])
    deep_theirs, rss_theirs = llama(a, 0, 64, args.depth, ["-ctk", "f16", "-ctv", "f16"])
    rows.append((f"decode tg64, depth {args.depth}, f16 KV", deep[("tg64", args.depth)],
                 deep_theirs[("tg64", args.depth)]))

    print(f"{args.name} q8_0, {args.threads} threads; {args.reps} repetitions of pp512 and tg128, "
          f"{args.long_reps} of the rest; tokens/s, mean ± sd\n")
    print("| measure | longrun | llama.cpp | ratio |\n|---|---:|---:|---:|")
    for name, ours_ts, theirs_ts in rows:
        print(f"| {name} | {cell(ours_ts)} | {cell(theirs_ts)} | {ours_ts[0] / theirs_ts[0]:.2f}x |")
    print(f"| peak RSS, {args.depth // 1024}K context (MB) | {rss_ours:.0f} | {rss_theirs:.0f} | "
          f"{rss_ours / rss_theirs:.2f}x |")
    tg, pp = rows[len(longs) + 1][1][0], rows[0][1][0]
    tg_theirs, pp_theirs = rows[len(longs) + 1][2][0], rows[0][2][0]
    print(f"\n{cpu_line()}")
    flops_peak, madds_peak, read_peak = peaks(args.threads)
    gbs, gbs_theirs = tg * weights_mb / 1e3, tg_theirs * weights_mb / 1e3
    gflops, gflops_theirs = 2 * params * pp / 1e9, 2 * params * pp_theirs / 1e9
    print(f"longrun decode reads {weights_mb:.1f} MB of weights per token: {gbs:.1f} GB/s at tg128, "
          f"{100 * gbs / read_peak:.0f}% of the measured read rate (llama.cpp {gbs_theirs:.1f} GB/s, "
          f"{100 * gbs_theirs / read_peak:.0f}%); prefill pp512 does {gflops:.1f} GFLOP/s of matrix "
          f"products, {100 * gflops / (2 * madds_peak):.0f}% of the int16 pair multiply-add peak "
          f"(llama.cpp {gflops_theirs:.1f}, {100 * gflops_theirs / (2 * madds_peak):.0f}%)")


if __name__ == "__main__":
    main()
