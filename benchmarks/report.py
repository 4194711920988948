"""Render the tables of BENCHMARKS.md from benchmarks/results/*.json (no measurement here).

``python benchmarks/report.py`` prints Markdown; BENCHMARKS.md embeds its output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def _env(e: dict) -> str:
    dirty = " (+ uncommitted changes)" if e.get("dirty") else ""
    return f"{e['device']}, torch {e['torch']}, commit `{e['commit'][:10]}`{dirty}"


def overhead() -> list[str]:
    out = ["| model | device / dtype | batch | base step (ms, median) | DSBP full-step ratio "
           "(median, IQR) | pooled fwd/bwd ratio | DSBP opt.-step extra (ms) | other path "
           "ratio (pooled) | refresh (ms) | refresh amortised p=100 | total |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    envs = []
    for p in sorted(RESULTS.glob("step_overhead_*.json")):
        r = json.loads(p.read_text())
        a = r["args"]
        if "block" in r:  # GPU runs: block timing, in gpu_overhead()
            continue
        model = "SmallCNN" if a["model"] == "cnn" else f"ResNet-18 (width {a['width']})"
        fr = r["dsbp_full_ratio"]
        other = "dsbp_loop_full_ratio_pooled_fwd_bwd"  # runs before path= (the loop was "other")
        total = r["dsbp_full_ratio_pooled_fwd_bwd"] + r["refresh_amortised_fraction"]["median"]
        out.append(
            f"| {model} | {a['device']} / {a['dtype']} | {a['batch']} | "
            f"{1e3 * r['arms']['base']['full_s']['median']:.1f} | "
            f"{fr['median']:.3f} ({fr['q1']:.2f}-{fr['q3']:.2f}) | "
            f"{r['dsbp_full_ratio_pooled_fwd_bwd']:.4f} | {r['dsbp_step_extra_ms']:.2f} | "
            f"{r.get('dsbp_stacked_full_ratio_pooled_fwd_bwd', r.get(other)):.4f} | "
            f"{1e3 * r['refresh_cost_s']['median']:.0f} | "
            f"{100 * r['refresh_amortised_fraction']['median']:.2f}% | {total:.3f}x |")
        envs.append(f"- `{p.name}`: {_env(r['env'])}; `python benchmarks/step_overhead.py "
                    f"--model {a['model']} --batch {a['batch']} --repeats {a['repeats']} "
                    f"--threads {a['threads']}`")
    return out + [""] + envs


def gpu_overhead() -> list[str]:
    """Step-overhead runs with block timing (``--block``): ratios of blocks of consecutive
    steps with no synchronisation inside, arms interleaved; plus the refresh cost."""
    out = ["| model | device / dtype | batch | SGD step (ms, block median) | DSBP (CUDA graph) "
           "/ SGD (median, IQR) | eager stacked / SGD | reference loop / SGD | refresh (ms): "
           "batched / per-layer | refresh amortised p=100 | total p=100 | total p=20 |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    envs = []
    for p in sorted(RESULTS.glob("step_overhead_*.json")):
        r = json.loads(p.read_text())
        if "block" not in r:
            continue
        a, b = r["args"], r["block"]
        model = "SmallCNN" if a["model"] == "cnn" else f"ResNet-18 (width {a['width']})"
        base = b["base_step_s"]["median"]
        ratio = b["dsbp_ratio"]
        ref = r["refresh_cost_s"]["median"]
        per_layer = r.get("refresh_layer_cost_s", {}).get("median")
        eager = b.get("dsbp_eager_ratio", {}).get("median")
        out.append(
            f"| {model} | {a['device']} / {a['dtype']} | {a['batch']} | {1e3 * base:.2f} | "
            f"{ratio['median']:.3f} ({ratio['q1']:.3f}-{ratio['q3']:.3f}) | "
            + (f"{eager:.3f}" if eager else "n/a") + f" | {b['dsbp_loop_ratio']['median']:.3f} | "
            f"{1e3 * ref:.1f} / " + (f"{1e3 * per_layer:.1f}" if per_layer else "n/a") + " | "
            f"{100 * ref / 100 / base:.2f}% | {ratio['median'] + ref / 100 / base:.3f}x | "
            f"{ratio['median'] + ref / 20 / base:.3f}x |")
        envs.append(f"- `{p.name}`: {_env(r['env'])}; `python benchmarks/step_overhead.py "
                    f"--model {a['model']} --width {a['width']} --device {a['device']} "
                    f"--dtype {a['dtype']} --batch {a['batch']} --repeats {a['repeats']} "
                    f"--block {a['block']} --blocks {a['blocks']}`")
    return out + [""] + envs if envs else ["(not run)"]


def projection() -> list[str]:
    out = ["| device | model | batched path (ms) | per-weight loop (ms) | loop / batched |",
           "|---|---|---|---|---|"]
    envs = []
    for name in ("projection_only_cpu.json", "projection_only_cuda.json"):
        r = _load(name)
        if r is None:
            continue
        dev = "cuda" if "cuda" in name else "cpu"
        for case, c in r["cases"].items():
            out.append(f"| {dev} | {case} | {1e3 * c['fast_s']['median']:.2f} | "
                       f"{1e3 * c['loop_s']['median']:.2f} | {c['loop_over_fast']:.2f}x |")
        cmd = r["command"] + (" --device cuda" if dev == "cuda" else "")
        envs.append(f"- {dev}: {_env(r['env'])}; `{cmd}`")
    return out + [""] + envs if envs else ["(not run)"]


def memory() -> list[str]:
    return _memory("subspace_memory_cpu.json")


def gpu_memory() -> list[str]:
    return _memory("subspace_memory_cuda.json", " --device cuda")


def _memory(name: str, flag: str = "") -> list[str]:
    r = _load(name)
    if r is None:
        return ["(not run)"]
    out = ["| d | k = d/16 | optimizer | params (MiB) | optimizer state (MiB, exact) | "
           "AdamW state / this | peak above model (MiB) | AdamW peak / this |",
           "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        if "error" in x:
            why = x["error"].strip().splitlines()[-1]  # the exception line of the traceback
            out.append(f"| {x['d']} | {x['d'] // 16} | {x['arm']} | | not measured: "
                       f"{why} | | | |")
            continue
        out.append(f"| {x['d']} | {x['rank']} | {x['arm']} | {x['params_bytes'] / 2**20:.1f} | "
                   f"{x['state_bytes'] / 2**20:.2f} | "
                   f"{x.get('state_reduction_vs_adamw', 0):.2f}x | "
                   f"{x['peak_bytes'] / 2**20:.0f} | {x.get('peak_reduction_vs_adamw', 0):.2f}x |")
    return out + ["", f"- {_env(r['env'])}; `{r['command']}{flag}`"]


def curves() -> list[str]:
    r = _load("subspace_curves_fmnist.json")
    if r is None:
        return ["(not run)"]
    out = ["| optimizer | final test acc | best test acc | mean train loss, last 100 steps | "
           "optimizer state (MiB) | wall (s) |", "|---|---|---|---|---|---|"]
    for arm, c in r["curves"].items():
        if "error" in c:
            out.append(f"| {arm} | {c['error']} | | | | |")
            continue
        last = c["train_loss"][-100:]
        out.append(f"| {arm} | {c['test_acc'][-1][1]:.4f} | {max(a for _, a in c['test_acc']):.4f}"
                   f" | {sum(last) / len(last):.4f} | {c['state_bytes'] / 2**20:.2f} | "
                   f"{c['seconds']:.0f} |")
    return out + ["", f"- {_env(r['env'])}; `{r['command']}`"]


def scaling() -> list[str]:
    r = _load("scaling_cpu.json")
    if r is None:
        return ["(not run)"]
    out = ["| sweep | width | depth | batch | SGD step (ms) | DSBP / SGD (p=100 amortised) | "
           "SAM / SGD | state+transient MiB: SGD / DSBP / SAM |",
           "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        mem = " / ".join(f"{(x['state_bytes'][a] + x['transient_bytes'][a]) / 2**20:.1f}"
                         for a in ("sgd", "dsbp", "sam"))
        out.append(f"| {x['sweep']} | {x['width']} | {x['depth']} | {x['batch']} | "
                   f"{1e3 * x['time_s']['sgd']['median']:.1f} | {x['ratio_vs_sgd']['dsbp']:.3f} | "
                   f"{x['ratio_vs_sgd']['sam']:.2f} | {mem} |")
    return out + ["", f"- {_env(r['env'])}; `{r['command']}`"]


def sampler() -> list[str]:
    r = _load("row_sampler_cpu.json")
    if r is None:
        return ["(not run)"]
    out = [f"| candidate rows n (m = {r['m']}) | permutation (ms) | uniform subset (ms) | "
           "speed-up |", "|---|---|---|---|"]
    for n, c in r["cases"].items():
        sub = c.get("subset", c.get("stratified"))
        out.append(f"| {int(n):,} | {1e3 * c['permutation']['median']:.2f} | "
                   f"{1e3 * sub['median']:.3f} | {c['speedup']:.0f}x |")
    note = "(`_pick` keeps the permutation up to n = 16m)"
    return out + ["", f"- {_env(r['env'])}; `{r['command']}` {note}"]


def recommended() -> list[str]:
    """The recommended configuration's whole-step cost against SGD (blocks of p steps)."""
    r = _load("recommended_cost_cpu.json")
    if r is None:
        return ["(not run)"]
    names = {"mlp": "MLP 784-512-512-512-10", "mlp_w256": "MLP 784-256-256-10",
             "mlp_w1024": "MLP 784-1024-1024-10", "smallcnn": "SmallCNN",
             "resnet18": "ResNet-18 (width 0.25)"}
    out = ["| model | batch | SGD step (ms) | recommended / SGD (median, IQR) | refresh amortised "
           "(p = 20) | recommended without refreshes | paper settings | paper settings, "
           "low-rank backward |", "|---|---|---|---|---|---|---|---|"]
    for key, m in r["models"].items():
        rr = m["recommended_ratio"]
        out.append(f"| {names.get(key, key)} | {m['batch']} | "
                   f"{1e3 * m['step_s']['sgd']['median']:.2f} | {rr['median']:.3f}x "
                   f"({rr['q1']:.3f}-{rr['q3']:.3f}) | "
                   f"{100 * m['refresh_amortised_fraction']['median']:.2f}% | "
                   f"{m['no_refresh_ratio']['median']:.3f}x | {m['paper_ratio']['median']:.3f}x | "
                   f"{m['paper_lowrank_ratio']['median']:.3f}x |")
    return out + ["", f"- {_env(r['env'])}; `{r['command']}`"]


def main() -> None:
    parts = {"recommended": recommended, "overhead": overhead, "gpu_overhead": gpu_overhead,
             "projection": projection, "sampler": sampler, "memory": memory,
             "gpu_memory": gpu_memory, "curves": curves, "scaling": scaling}
    names = sys.argv[1:] or list(parts)
    for n in names:
        print(f"<!-- {n} -->")
        print("\n".join(parts[n]()))
        print()


if __name__ == "__main__":
    main()
