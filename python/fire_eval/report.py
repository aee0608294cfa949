"""Results as a table (markdown), a JSON file and a PNG plot."""
import json
from pathlib import Path
from typing import Optional


def headline_name(fire_defenses) -> Optional[str]:
    """The FIRE defense (among the names given, in run order) that the AUROC, online curve,
    ablations and layer table follow: `fire` (mode chosen), else `fire-clamp`, else the first."""
    names = list(fire_defenses)
    return next((n for n in ("fire", "fire-clamp") if n in names), names[0] if names else None)


def label(res: dict, results: list) -> str:
    """The attack, and the model where the runs cover more than one."""
    models = {r["config"].get("model") for r in results}
    return res["config"]["attack"] + (f" / {res['config'].get('model')}" if len(models) > 1 else "")


def choice(d: dict) -> str:
    """A FIRE choice (layers, form, mode, tau quantile, alpha, smoothing) as the tables write it."""
    form = ", per position" if d.get("form") == "per_position" else ""
    mode = f", {d['mode']}" if "mode" in d else ""
    tau = f" (tau q {d['tau_quantile']:g})" if d.get("tau_quantile") is not None else ""
    sm = d.get("smoothing")
    smooth = f", smoothing at {sm['layer']} (gate q {sm['quantile']:g})" if sm else ""
    return f"{'+'.join(d['layers'])}{form}{mode}{tau}, alpha {d['alpha']:g}{smooth}"


def table(results: list) -> str:
    lines = ["| attack | defense | CA % | ASR % | PA % | rejected (clean / poisoned) % | chosen |",
             "|---|---|---:|---:|---:|---:|---|"]
    for res in results:
        implanted = next((r["ASR"] for r in res["rows"] if r["defense"] == "none"), 1.0) >= 0.5
        for row in res["rows"]:
            if not implanted and row["defense"] == "none":
                row = {**row, "defense": "none (attack not implanted: ASR < 50%)"}
            chosen = choice(row) if "layers" in row else ""
            rej = ""
            if row["defense"] == "strip":
                rej = f"{100 * row['reject_clean']:.1f} / {100 * row['reject_poison']:.1f}"
            lines.append(f"| {label(res, results)} | {row['defense']} | {100 * row['CA']:.1f} | "
                         f"{100 * row['ASR']:.1f} | {100 * row['PA']:.1f} | {rej} | {chosen} |")
    extra = ["", "| attack | detection AUROC | online: PA after 0 / 8 / all seen | online ms per sample "
             "| online follows |", "|---|---:|---|---:|---|"]
    for res in results:
        if "auroc" not in res:
            continue
        online = res.get("online")
        curve = ""
        if online:
            c = online["curve"]
            picks = [c[0], c[min(1, len(c) - 1)], c[-1]]
            curve = " / ".join(f"{100 * pa:.0f} ({seen})" for seen, pa in picks)
        ms = f"{online['ms_per_sample']:.2f}" if online else ""
        # runs before 2026-12-01 followed the headline, unnamed
        follows = f"{online['follows']}: {choice(online)}" if online and "follows" in online else ""
        extra.append(f"| {label(res, results)} | {res['auroc']:.3f} | {curve} | {ms} | {follows} |")
    return "\n".join(lines + extra)


def draws_table(results: list) -> str:
    """Paired FIRE's headline over draws of the defender's pairs (`RunConfig.pair_draws`): PA's
    spread, and how many draws reach 0.95 x the undefended model's CA."""
    lines = ["| attack | defense | draws | PA mean % | PA worst % | PA best % | CA mean % | "
             "draws with PA >= 0.95 x CA |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        if "pair_draws" not in res:
            continue
        draws = res["pair_draws"]["draws"]
        pa, ca = [d["PA"] for d in draws], [d["CA"] for d in draws]
        ca_none = next((r["CA"] for r in res["rows"] if r["defense"] == "none"), None)
        meets = sum(p >= 0.95 * (ca_none if ca_none is not None else c) for p, c in zip(pa, ca, strict=True))
        lines.append(f"| {label(res, results)} | {res['pair_draws']['defense']} | {len(draws)} | "
                     f"{100 * sum(pa) / len(pa):.1f} | {100 * min(pa):.1f} | {100 * max(pa):.1f} | "
                     f"{100 * sum(ca) / len(ca):.1f} | {meets} / {len(draws)} |")
    return "\n".join(lines)


def ablation_table(results: list) -> str:
    lines = ["| attack | ablation | CA % | ASR % | PA % |", "|---|---|---:|---:|---:|"]
    for res in results:
        for row in res.get("ablations", []):
            if "error" in row:
                lines.append(f"| {label(res, results)} | {row['ablation']} | n/a | n/a | {row['error']} |")
            else:
                lines.append(f"| {label(res, results)} | {row['ablation']} | {100 * row['CA']:.1f} | "
                             f"{100 * row['ASR']:.1f} | {100 * row['PA']:.1f} |")
    return "\n".join(lines)


def layer_table(results: list) -> str:
    """The layer(s) FIRE chose without labels, against the single layer with the best PA on the
    evaluation set in hindsight (same mode and alpha)."""
    lines = ["| attack | chosen (no labels) | its PA % | best layer in hindsight | its PA % |",
             "|---|---|---:|---|---:|"]
    for res in results:
        per_layer = [r for r in res.get("ablations", []) if r["ablation"].startswith("layer=") and "PA" in r]
        fire = {r["defense"]: r for r in res["rows"] if "layers" in r}
        chosen = fire.get(headline_name(fire))
        if not per_layer or chosen is None:
            continue
        best = max(per_layer, key=lambda r: r["PA"])
        form = " (per position)" if chosen.get("form") == "per_position" else ""
        lines.append(f"| {label(res, results)} | {'+'.join(chosen['layers'])}{form} | {100 * chosen['PA']:.1f} | "
                     f"{best['ablation'][6:]} | {100 * best['PA']:.1f} |")
    return "\n".join(lines)


def run_key(run: dict) -> tuple:
    """What makes two runs the same experiment: data, model, attack and its parameters, rate, seed."""
    c = run["config"]
    return (c.get("data"), c.get("model"), c.get("width"), c.get("epochs"), c["attack"],
            json.dumps(run.get("attack_params", {}), sort_keys=True), c.get("rate"), c.get("seed"))


def update_runs(base: list, updates: list, drop=()) -> list:
    """`base` runs with the rows of same-experiment `updates` laid over them: a defense in both
    takes the update's row (and evidence), a new defense is added after the row the update lists
    before it (at the end where the base has none such). The update's detection AUROC, online
    curve and ablations replace the base's where its headline FIRE defense is the merged run's
    (they follow it); its draws of the pairs replace the base's, which go where the update
    refits their defense without them. An update must find its experiment in `base` with the
    same undefended row (the same cached model, split and seed), else it is an error: rows of
    different models are never mixed.
    Defenses named in `drop` leave the merged runs (e.g. a defense the code no longer has)."""
    index = {run_key(r): r for r in base}
    out = [dict(r) for r in base]
    by_key = {run_key(r): r for r in out}
    for new in updates:
        old = index.get(run_key(new))
        if old is None:
            raise ValueError(f"no base run matches the update {run_key(new)}")
        none_old = next((r for r in old["rows"] if r["defense"] == "none"), None)
        none_new = next((r for r in new["rows"] if r["defense"] == "none"), None)
        if none_old is not None and none_new is not None and \
                any(none_old[m] != none_new[m] for m in ("CA", "ASR", "PA")):
            raise ValueError(f"the update of {run_key(new)} has another undefended model ({none_new} against "
                             f"{none_old}): not the same experiment")
        run = by_key[run_key(new)]  # the merged state so far: later updates lay over earlier ones
        rows = {r["defense"]: r for r in new["rows"]}
        merged = [rows.pop(r["defense"], r) for r in run["rows"]]
        for before, row in zip([None, *new["rows"][:-1]], new["rows"], strict=True):  # a new defense goes
            if row["defense"] in rows:  # after the row the update lists before it, where the base has it
                at = next((i + 1 for i, r in enumerate(merged) if before and r["defense"] == before["defense"]),
                          len(merged))
                merged.insert(at, rows.pop(row["defense"]))
        run["rows"] = merged
        run["fire"] = {**run.get("fire", {}), **new.get("fire", {})}
        # they follow the headline: an update whose own headline is not the merged run's (it refits
        # only fire-clamp-unpaired, say) leaves the base's in place
        fire_rows = [r["defense"] for r in merged if "layers" in r]
        if headline_name(fire_rows) == headline_name([r["defense"] for r in new["rows"] if "layers" in r]):
            for key in ("auroc", "online", "ablations"):
                if key in new:
                    run[key] = new[key]
        # the draws of the pairs belong to their headline's row: refitted without them, they are stale
        if "pair_draws" in new:
            run["pair_draws"] = new["pair_draws"]
        elif run.get("pair_draws", {}).get("defense") in {r["defense"] for r in new["rows"]}:
            del run["pair_draws"]
        run["updates"] = run.get("updates", []) + [sorted(r["defense"] for r in new["rows"])]
    for run in out:
        if any(r["defense"] in drop for r in run["rows"]):
            run["rows"] = [r for r in run["rows"] if r["defense"] not in drop]
            run["fire"] = {k: v for k, v in run.get("fire", {}).items() if k not in drop}
            if run.get("pair_draws", {}).get("defense") in drop:
                del run["pair_draws"]
            run["dropped"] = sorted(set(run.get("dropped", [])) | set(drop))
    return out


def write_json(results: list, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"runs": results}, indent=1, default=float))


def plot(results: list, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [label(r, results) for r in results]
    defenses = [row["defense"] for row in results[0]["rows"]]
    references = {row["defense"] for r in results for row in r["rows"] if row.get("reference")}
    online = [r for r in results if r.get("online")]
    # the online panel only where a run measured online FIRE: an empty third panel reads as a failure
    fig, axes = plt.subplots(1, 3 if online else 2, figsize=(18 if online else 12.5, 5.6))
    width = 0.8 / max(len(defenses), 1)
    # a colour per defense (tab10 repeats after ten); reference rows (a clean model) hatched
    colours = plt.get_cmap("tab10" if len(defenses) <= 10 else "tab20").colors
    for ax, metric in zip(axes[:2], ("PA", "ASR"), strict=True):
        for j, d in enumerate(defenses):
            vals = [100 * next((row[metric] for row in r["rows"] if row["defense"] == d), float("nan"))
                    for r in results]
            ax.bar([i + j * width for i in range(len(attacks))], vals, width, label=d,
                   color=colours[j % len(colours)], hatch="///" if d in references else None,
                   edgecolor="black" if d in references else None, linewidth=0.3)
        if metric == "PA":  # the headline over draws of the defender's pairs: mean, worst to best
            drawn = [(i, r["pair_draws"]) for i, r in enumerate(results)
                     if "pair_draws" in r and r["pair_draws"]["defense"] in defenses]
            for n, (i, draws) in enumerate(drawn):
                pa = [100 * d["PA"] for d in draws["draws"]]
                mean = sum(pa) / len(pa)
                ax.errorbar(i + defenses.index(draws["defense"]) * width, mean,
                            yerr=[[mean - min(pa)], [max(pa) - mean]], fmt="o", ms=3, color="black", capsize=2,
                            lw=1, label="headline over draws of the pairs" if n == 0 else None)
        # labels like "adaptive / cnn" overlap side by side past a few attacks: slanted
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(attacks))], attacks,
                      rotation=30 if len(attacks) > 4 else 0, ha="right" if len(attacks) > 4 else "center")
        ax.set_ylabel(f"{metric} %")
        ax.set_ylim(0, 100)
        ax.set_title({"PA": "Poisoned accuracy (higher is better)",
                      "ASR": "Attack success rate (lower is better)"}[metric])
    # one legend for both bar charts, below them: never over the bars
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    for r in online:
        c = r["online"]["curve"]
        axes[2].plot([s for s, _ in c], [100 * pa for _, pa in c], marker="o", ms=3, label=label(r, results))
    if online:
        axes[2].set_xlabel("poisoned samples seen (online)")
        axes[2].set_ylabel("PA %")
        axes[2].set_ylim(0, 100)
        axes[2].set_title("Online FIRE (the headline defense's mode)")
        axes[2].legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.1 if len(defenses) > 6 else 0.06, 1, 1))  # room for the legend below
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
