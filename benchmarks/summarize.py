"""Turns a pytest-benchmark JSON file into the markdown tables of benchmarks/README.md:
ratios of our op to eager PyTorch and to torch.compile (same run), achieved bandwidth and its
fraction of the copy bandwidth, end-to-end overhead, online latency, and whether each target
is met.

    python benchmarks/summarize.py benchmarks/results/<file>.json

(also strips the raw per-round timings from the file, which are too large to commit)
"""
import json
import sys
from collections import defaultdict


def _seconds(b):
    info = b["extra_info"]
    return info["do_bench_ms"] / 1e3 if "do_bench_ms" in info else b["stats"]["median"]


def op_table(benchmarks, gpu: bool) -> list:
    groups = defaultdict(dict)
    for b in benchmarks:
        info = b["extra_info"]
        if "impl" in info:
            key = (info["case"], info["N"], info["K"], info["dtype"].replace("torch.", ""), info["mode"])
            groups[key][info["impl"]] = (_seconds(b), info.get("GBps"))
    head = ("| case | N | K | dtype | mode | fire ms | eager ms | compile ms | vs eager | vs compile | fire GB/s | "
            "% of copy |" + (" CUDA C++ ms |" if gpu else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3], k[4])):
        g = groups[key]
        if not {"fire", "eager", "compile", "copy"} <= set(g):
            continue
        fire, eager, comp, copy = g["fire"][0], g["eager"][0], g["compile"][0], g["copy"][0]
        row = (f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {1e3 * fire:.3f} | {1e3 * eager:.3f} | "
               f"{1e3 * comp:.3f} | {eager / fire:.2f}x | {comp / fire:.2f}x | {g['fire'][1]:.1f} | "
               f"{100 * copy / fire:.0f}% |")
        if gpu and "fire-cuda-native" in g:
            row += f" {1e3 * g['fire-cuda-native'][0]:.3f} |"
        lines.append(row)
    return lines


def e2e_table(benchmarks) -> list:
    groups = defaultdict(dict)
    for b in benchmarks:
        info = b["extra_info"]
        if "repaired" in info:
            groups[(info["arch"], info["batch"], info["compiled"])][info["repaired"]] = _seconds(b)
    lines = ["| model | batch | | plain ms | repaired ms | overhead |", "|---|---|---|---|---|---|"]
    for (arch, batch, compiled), g in sorted(groups.items()):
        if True in g and False in g:
            lines.append(f"| {arch} | {batch} | {'compiled' if compiled else 'eager'} | {1e3 * g[False]:.2f} | "
                         f"{1e3 * g[True]:.2f} | {100 * (g[True] / g[False] - 1):+.1f}% |")
    return lines


def online_table(benchmarks) -> list:
    lines = ["| model | layer | batch | ms per sample (repair + direction update) |", "|---|---|---|---|"]
    for b in benchmarks:
        info = b["extra_info"]
        if "ms_per_sample" in info:
            lines.append(f"| {info['arch']} | {info['layer']} | {info['batch']} | {info['ms_per_sample']:.3f} |")
    return lines


def strip_raw(path) -> None:
    """pytest-benchmark's JSON keeps every raw timing (tens of MB); keep the statistics only."""
    data = json.load(open(path))
    for b in data["benchmarks"]:
        b["stats"].pop("data", None)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def main(path):
    strip_raw(path)
    data = json.load(open(path))
    benchmarks = data["benchmarks"]
    device = benchmarks[0]["extra_info"].get("device", "?") if benchmarks else "?"
    gpu = any("do_bench_ms" in b["extra_info"] for b in benchmarks)
    out = [f"Device: {device}; torch {benchmarks[0]['extra_info'].get('torch', '?')}; "
           f"{data.get('datetime', '')}", "", "### The op", ""]
    out += op_table(benchmarks, gpu) + ["", "### End to end", ""] + e2e_table(benchmarks)
    out += ["", "### Online step", ""] + online_table(benchmarks)
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
