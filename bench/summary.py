"""Condenses a bench.solvers JSON into one line per NFE budget: the best host built-in, the best Quickstep sampler on
the host's schedulers (qs_dmn included), each with its error and its ratio to the best host built-in. qs_paradigms is left out: its counted calls are batched rounds, each
evaluating a whole window, so its NFE is not comparable.
usage: python -m bench.summary bench/results/solvers_oracle.json [...]"""
import json
import sys


def best(table, names, nfe):
    rows = [(table[n][str(nfe)]["error"], n, table[n][str(nfe)]["scheduler"]) for n in names
            if table[n].get(str(nfe))]
    return min(rows) if rows else None


def summarize(path):
    data = json.load(open(path))
    lines = []
    for case, table in data["results"].items():
        host = [n for n in table if not n.startswith("qs_")]
        ours = [n for n in table if n.startswith("qs_") and n != "qs_paradigms"]
        lines += [f"**{case}** (RMS error vs the exact / 500-step reference, {data['samples']} samples)", "",
                  "| NFE | best host built-in | best Quickstep sampler, host schedulers | ratio |", "|---|---|---|---|"]
        for nfe in data["nfe"]:
            h, q = best(table, host, nfe), best(table, ours, nfe)
            cell = lambda r: f"{r[1]} / {r[2]}: {r[0]:.4f}" if r else "-"  # noqa: E731
            ratio = lambda r: f"{r[0] / h[0]:.2f}x" if r and h else "-"  # noqa: E731
            lines.append(f"| {nfe} | {cell(h)} | {cell(q)} | {ratio(q)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n".join(summarize(p) for p in sys.argv[1:]))
