"""Plot pass-key accuracy against prompt length from one or more `./run -m passkey` tables.

    python tools/plot_passkey.py -o passkey.png memory.txt window.txt [--label memory --label window]

Each file holds what `-m passkey` prints on stdout (one or more runs appended): a markdown
table whose rows are `| tokens | found/trials per depth ... | all |`. Rows of one length found
in several tables of a file are added up. Each file becomes one line, labelled by --label in
order, else by its file name; each point is annotated with its found/trials.
"""
import argparse
import os
import re

CELL = re.compile(r"^(\d+)/(\d+)$")


def read_table(path):
    """{tokens: [found, trials]}: every row of every table in the file, cells summed."""
    results = {}
    with open(path) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 3 or not cells[0].isdigit():
                continue
            found = trials = 0
            for c in cells[1:-1]:   # the depths; the last column is the row's percentage
                m = CELL.match(c)
                if not m:
                    raise SystemExit(f"error: {path}: '{c}' in row {cells[0]} is not found/trials")
                found += int(m.group(1))
                trials += int(m.group(2))
            total = results.setdefault(int(cells[0]), [0, 0])
            total[0] += found
            total[1] += trials
    if not results:
        raise SystemExit(f"error: {path}: no passkey table rows (| tokens | k/n ... | all |)")
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", nargs="+", help="files of -m passkey output, one line each")
    ap.add_argument("-o", "--out", required=True, help="PNG to write")
    ap.add_argument("--label", action="append", default=[], help="legend label per file, in order")
    ap.add_argument("--title", default="pass-key accuracy vs prompt length")
    ap.add_argument("--trained", type=int, default=0,
                    help="draw a vertical line at the trained context")
    a = ap.parse_args()
    if a.label and len(a.label) != len(a.tables):
        raise SystemExit(f"error: {len(a.label)} labels for {len(a.tables)} files")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    placed = {}   # (x, y): labels already there, so a series on top of another stays readable
    markers = "osD^v<>"
    for i, path in enumerate(a.tables):
        results = read_table(path)
        xs = sorted(results)
        ys = [100 * results[x][0] / results[x][1] for x in xs]
        label = a.label[i] if a.label else os.path.basename(path)
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=label,
                linewidth=max(3.5 - 0.6 * i, 1), markersize=max(9 - 1.2 * i, 4))
        for x, y in zip(xs, ys):
            above = placed.get((x, y), 0)
            placed[(x, y)] = above + 1
            ax.annotate(f"{results[x][0]}/{results[x][1]}", (x, y), textcoords="offset points",
                        xytext=(0, 6 + 9 * above), ha="center", fontsize=7,
                        color=ax.lines[-1].get_color())
    if a.trained:
        ax.axvline(a.trained, color="grey", linestyle=":", label="trained context")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("keys found (%)")
    ax.set_ylim(-5, 124)
    ax.set_title(a.title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
