"""Turns a pytest-benchmark JSON file into the markdown tables of benchmarks/README.md:
ratios of our op to eager PyTorch and to torch.compile (same run), achieved bandwidth and its
fraction of the copy bandwidth, end-to-end overhead, online latency, and whether each target
is met.

    python benchmarks/summarize.py benchmarks/results/<file>.json [--before <older>.json[,<older>.json]]

On a CPU run it adds the per-call overhead at batch 1 (against the older run with --before) and
the K = 16 bandwidth fractions at batch 256.

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


def _op_groups(benchmarks) -> dict:
    """(case, N, K, dtype, mode) -> {impl: seconds}, the plain and the per-position op cases."""
    groups = defaultdict(dict)
    for b in benchmarks:
        info = b["extra_info"]
        if "impl" in info:
            key = (info["case"], info["N"], info["K"], info["dtype"].replace("torch.", ""), info["mode"])
            groups[key][info["impl"]] = _seconds(b)
    return groups


def batch1_table(benchmarks, before=None) -> list:
    """Every batch-1 case: our op against eager and torch.compile, and against an older run."""
    now, old = _op_groups(benchmarks), _op_groups(before or [])
    head = ("| case | K | dtype | before: fire us (vs eager) | now: fire us | eager us | compile us | now vs eager "
            "| now vs compile | fire under torch.compile us | vs compile, both compiled |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    worst = worst_compiled = None
    for key in sorted(k for k in now if k[1] == 1 and k[4] == "clamp"):
        g = now[key]
        if not {"fire", "eager", "compile"} <= set(g):
            continue
        o = old.get(key, {})
        was = f"{1e6 * o['fire']:.0f} ({o['eager'] / o['fire']:.2f}x)" if {"fire", "eager"} <= set(o) else "-"
        ratio = g["eager"] / g["fire"]
        worst = min(worst or (ratio, key), (ratio, key))
        fc = g.get("fire-compiled")  # our op called from a compiled function, against the compiled maths
        under = (f"{1e6 * fc:.0f}", f"{g['compile'] / fc:.2f}x") if fc else ("-", "-")
        if fc:
            worst_compiled = min(worst_compiled or (g["compile"] / fc, key), (g["compile"] / fc, key))
        lines.append(f"| {key[0]} | {key[2]} | {key[3]} | {was} | {1e6 * g['fire']:.0f} | {1e6 * g['eager']:.0f} | "
                     f"{1e6 * g['compile']:.0f} | {ratio:.2f}x | {g['compile'] / g['fire']:.2f}x | {under[0]} | "
                     f"{under[1]} |")
    if worst:
        r, k = worst
        lines += ["", f"worst ratio against eager at batch 1: {r:.2f}x ({k[0]}, K = {k[2]}, {k[3]})"]
    if worst_compiled:
        r, k = worst_compiled
        lines += [f"worst ratio of our op under torch.compile against the compiled maths at batch 1: {r:.2f}x "
                  f"({k[0]}, K = {k[2]}, {k[3]})"]
    return lines


def k16_table(benchmarks, before=None, batch=256) -> list:
    """K = 16 against K = 1 (memory-bound where the data is in DRAM) and against a copy."""
    g, old = _op_groups(benchmarks), _op_groups(before or [])
    lines = ["| case | dtype | before: K=1 / K=16 ms | K=1 ms | K=4 ms | K=16 ms | copy ms | K=16 at the speed of K=1 "
             "| K=16 % of copy |", "|---|---|---|---|---|---|---|---|---|"]
    for case, n, k, dtype, mode in sorted(g):
        if n != batch or k != 16 or mode != "clamp" or case.startswith("pos-"):
            continue
        t = {kk: g.get((case, n, kk, dtype, mode), {}).get("fire") for kk in (1, 4, 16)}
        copy = g[(case, n, 16, dtype, mode)].get("copy")
        if None in t.values() or copy is None:
            continue
        was = [old.get((case, n, kk, dtype, mode), {}).get("fire") for kk in (1, 16)]
        was = f"{1e3 * was[0]:.2f} / {1e3 * was[1]:.2f}" if None not in was else "-"
        lines.append(f"| {case} | {dtype} | {was} | {1e3 * t[1]:.2f} | {1e3 * t[4]:.2f} | {1e3 * t[16]:.2f} | "
                     f"{1e3 * copy:.2f} | "
                     f"{100 * t[1] / t[16]:.0f}% | {100 * copy / t[16]:.0f}% |")
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


def export_table(benchmarks) -> list:
    """The AOTInductor package against eager, plain and repaired, from one run."""
    g = defaultdict(dict)
    for b in benchmarks:
        info = b["extra_info"]
        if "runtime" in info:
            g[(info["arch"], info["batch"])][(info["runtime"], info["with_repair"])] = _seconds(b)
    lines = ["| model | batch | eager plain ms | eager repaired ms | package plain ms | package repaired ms | "
             "repair in the package | package vs eager (repaired) |", "|---|---|---|---|---|---|---|---|"]
    for (arch, batch), t in sorted(g.items()):
        if len(t) == 4:
            ep, er, pp, pr = (1e3 * t[k] for k in [("eager", False), ("eager", True), ("package", False),
                                                   ("package", True)])
            lines.append(f"| {arch} | {batch} | {ep:.3f} | {er:.3f} | {pp:.3f} | {pr:.3f} | "
                         f"{100 * (pr / pp - 1):+.1f}% | {er / pr:.2f}x |")
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


def main(path, before_path=None):
    strip_raw(path)
    data = json.load(open(path))
    benchmarks = data["benchmarks"]
    device = benchmarks[0]["extra_info"].get("device", "?") if benchmarks else "?"
    gpu = any("do_bench_ms" in b["extra_info"] for b in benchmarks)
    out = [f"Device: {device}; torch {benchmarks[0]['extra_info'].get('torch', '?')}; "
           f"{data.get('datetime', '')}", "", "### The op", ""]
    out += op_table(benchmarks, gpu) + ["", "### End to end", ""] + e2e_table(benchmarks)
    out += ["", "### Exported package (AOTInductor)", ""] + export_table(benchmarks)
    out += ["", "### Online step", ""] + online_table(benchmarks)
    if not gpu:  # --before A.json,B.json: the older run's cases, from one or more files
        before = [b for p in before_path.split(",") for b in json.load(open(p))["benchmarks"]] if before_path else None
        out += ["", "### Batch 1: the per-call overhead", ""] + batch1_table(benchmarks, before)
        out += ["", "### K = 16 at batch 256 (clamp)", ""] + k16_table(benchmarks, before)
    print("\n".join(out))


if __name__ == "__main__":
    args = sys.argv[1:]
    before = args[args.index("--before") + 1] if "--before" in args else None
    main(args[0], before)
