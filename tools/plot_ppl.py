"""Plot perplexity against position from one or more `./run -m ppl --ppl-csv` files.

    python tools/plot_ppl.py -o curve.png none.csv yarn4.csv [--label none --label "yarn x4"]

Each CSV (first,last,tokens,mean_nll,ppl per bucket of predicted tokens) becomes one line,
labelled by --label in order, else by its file name. x is the bucket's last position.
--per-octave N joins consecutive buckets (their tokens' mean NLL) until each point spans at
least 1/N of an octave of position, so a 1M-token curve on the log axis stays readable.
"""
import argparse
import csv
import math
import os


def read_curve(path, per_octave):
    """(x, y): each point's last position and the perplexity of its tokens; per_octave 0 keeps
    every bucket, N joins buckets until a point spans 1 - 2^(-1/N) of its end position."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "mean_nll" not in rows[0]:
        raise SystemExit(f"error: {path}: not a ppl CSV (expected a header first,last,tokens,mean_nll,ppl)")
    min_fraction = 1 - 2 ** (-1 / per_octave) if per_octave else 0.0
    x, y, first, tokens, nll_sum = [], [], None, 0, 0.0
    for r in rows:
        first = int(r["first"]) if first is None else first
        tokens += int(r["tokens"])
        nll_sum += float(r["mean_nll"]) * int(r["tokens"])
        end = int(r["last"]) + 1
        if r is rows[-1] or end - first >= min_fraction * end:
            x.append(end - 1)
            y.append(math.exp(nll_sum / tokens))
            first, tokens, nll_sum = None, 0, 0.0
    return x, y


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csvs", nargs="+", help="ppl CSV files, one line each")
    ap.add_argument("-o", "--out", required=True, help="PNG to write")
    ap.add_argument("--label", action="append", default=[], help="legend label per CSV, in order")
    ap.add_argument("--title", default="perplexity vs position")
    ap.add_argument("--trained", type=int, default=0, help="draw a vertical line at the trained context")
    ap.add_argument("--per-octave", type=int, default=0, help="join buckets to at most N points per octave")
    ap.add_argument("--ymax", type=float, default=0, help="clip the y axis (log scale) at this perplexity")
    a = ap.parse_args()
    if a.label and len(a.label) != len(a.csvs):
        raise SystemExit(f"error: {len(a.label)} labels for {len(a.csvs)} CSV files")
    if a.per_octave < 0:
        raise SystemExit(f"error: --per-octave {a.per_octave}: must be 0 (every bucket) or more")
    import matplotlib  # here, not at the top: read_curve serves the tests, which lack matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, path in enumerate(a.csvs):
        x, y = read_curve(path, a.per_octave)
        ax.plot(x, y, label=a.label[i] if a.label else os.path.splitext(os.path.basename(path))[0], linewidth=1.4)
    if a.trained:
        ax.axvline(a.trained, color="grey", linestyle=":", linewidth=1)
        ax.text(a.trained, ax.get_ylim()[1], " trained context", color="grey", va="top", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if a.ymax:
        ax.set_ylim(top=a.ymax)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("perplexity of the bucket")
    ax.set_title(a.title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
