"""Benchmark reports: one JSON record, a Markdown page and a PNG chart per run, named by
device, date and commit (``bench-h200-2026-11-26-abc1234.json``), plus the plain table
printed at the end of ``fastbert bench``.

The JSON holds everything: ``meta`` (device, versions, commit, command line, which ops ran
kernels), ``ceilings`` (matmul TFLOP/s measured in the same run), ``measurements``
(``Measurement.as_dict()``), ``speedups`` (fastbert over every other implementation of the
same case) and ``notes`` (everything skipped or failed, and why).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from typing import Dict, List, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """Short commit of the source tree, with "+dirty" when it has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} threads)"


def device_slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100"; any CPU -> "cpu"."""
    if name.startswith("CPU"):
        return "cpu"
    match = re.search(r"\b([A-Za-z]{0,3}\d{2,4}[A-Za-z]?)\b", name.replace("NVIDIA", ""))
    return (match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # absent, or broken on import: either way, no version to report
        return None


def collect_meta(device: str, argv: List[str], dtype: str, quick: bool) -> Dict[str, object]:
    import fastbert
    from fastbert import ops
    now = datetime.datetime.now()
    name = device_name(device)
    return {
        "device": name, "device_type": torch.device(device).type, "device_slug": device_slug(name),
        "date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H:%M:%S"), "commit": git_commit(),
        "command": " ".join(["fastbert"] + list(argv)), "dtype": dtype, "quick": quick,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
                     "cuda": torch.version.cuda, "transformers": _version("transformers"), "fastbert": fastbert.__version__},
        "backend": fastbert.get_backend(), "ops": ops.describe(), "ops_on_device": ops_on_device(device),
        "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
    }


def ops_on_device(device: str) -> Dict[str, str]:
    """What each op actually runs on this device under the current backend."""
    from fastbert import ops
    out = {}
    for name, op in ops.OPS.items():
        try:
            fn = ops.implementation(name, torch.device(device))
            if fn is op.reference:
                out[name] = f"composed ({op.composed})" if op.composed else "reference (eager PyTorch)"
            elif fn is op.cpu:
                out[name] = f"CPU composition (fastbert.cpu.{name})"
            else:
                out[name] = f"kernel ({op.kernel})"
        except Exception as exc:  # the backend refuses: say why
            out[name] = f"unavailable ({exc})"
    return out


def file_stem(meta: Dict[str, object]) -> str:
    return f"bench-{meta['device_slug']}-{meta['date']}-{str(meta['commit']).replace('+', '-')}"


def speedups(measurements: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """fastbert's speed-up over every other implementation measured on the same case."""
    groups: Dict[tuple, Dict[str, Dict[str, object]]] = {}
    for m in measurements:
        groups.setdefault((m["suite"], m["name"], m["case"], m["mode"]), {})[m["impl"]] = m
    out = []
    for (suite, name, case, mode), impls in groups.items():
        mine = impls.get("fastbert")
        if mine is None:
            continue
        for impl, other in impls.items():
            if impl != "fastbert":
                out.append({"suite": suite, "name": name, "case": case, "mode": mode, "vs": impl,
                            "fastbert_ms": mine["ms"], "other_ms": other["ms"], "speedup": other["ms"] / mine["ms"]})
    return out


def _fmt(x, spec=".3g", none="—"):
    if x is None:
        return none
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return format(x, spec)


def _speedup_of(data, m) -> Optional[float]:
    if m["impl"] == "fastbert":
        return None
    for s in data["speedups"]:
        if (s["suite"], s["name"], s["case"], s["mode"], s["vs"]) == (m["suite"], m["name"], m["case"], m["mode"], m["impl"]):
            return s["speedup"]
    return None


def model_rows(data) -> List[List[str]]:
    rows = []
    for m in (m for m in data["measurements"] if m["suite"] == "model"):
        e = m["extra"]
        info = []
        if "graphs" in e:
            info.append(f"compiled in {e.get('first_call_s')} s: {e['graphs']} graph(s), {e.get('graph_breaks')} break(s)")
        elif e.get("first_call_s", 0) >= 1:
            info.append(f"first call {e['first_call_s']} s")
        if "tokens_per_s" in e:
            info.append(f"{e['tokens_per_s']:,.0f} real tokens/s over {e['steps_timed']} steps, "
                        f"loss {e['loss_first']:.3f} -> {e['loss_last']:.3f}; no parity check (dropout on)")
        if "fast_path" in e:
            info.append(f"fast path {'used' if e['fast_path'] else 'NOT used'}, nested tensors {'yes' if e.get('nested_tensors') else 'no'}")
        rows.append([m["name"], m["case"], m["impl"], _fmt(m["ms"], ".3f"), _fmt(m["tflops"], ".3g"),
                     _fmt(e.get("ceiling_frac") and 100 * e["ceiling_frac"], ".1f"), _fmt(_speedup_of(data, m), ".2f"),
                     _fmt(e.get("max_abs_diff_vs_hf"), ".2e"), _fmt(e.get("max_err_vs_fp32"), ".2e"),
                     _fmt(e.get("parity_ok")), "; ".join(info)])
    return rows


MODEL_HEAD = ["workload", "case", "impl", "ms", "useful TFLOP/s", "% of matmul", "fastbert speed-up",
              "max abs diff vs HF eager", "max err vs fp32", "parity ok", "notes"]
OP_HEAD = ["op", "case", "impl", "mode", "ms", "GB/s", "TFLOP/s", "fastbert speed-up"]


def op_rows(data) -> List[List[str]]:
    return [[m["name"], m["case"], m["impl"], m["mode"], _fmt(m["ms"], ".4f"), _fmt(m["gbps"], ".0f"),
             _fmt(m["tflops"], ".1f"), _fmt(_speedup_of(data, m), ".2f")]
            for m in data["measurements"] if m["suite"] != "model"]


def _md_table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(data, chart_name: Optional[str] = None) -> str:
    meta = data["meta"]
    v = meta["versions"]
    n = data["ceilings"].get("n")
    out = [f"# fastbert benchmark: {meta['device']}, {meta['date']}", "",
           f"- commit `{meta['commit']}`, command `{meta['command']}`",
           f"- torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, transformers {v['transformers']}, "
           f"Python {v['python']}; backend `{meta['backend']}`; {'quick' if meta['quick'] else 'full'} run",
           "- ops here: " + ", ".join(f"{k}: {s}" for k, s in meta["ops_on_device"].items()),
           "- " + (", ".join(f"{d} matmul {n}³: {t:.3g} TFLOP/s" for d, t in data["ceilings"].items() if d != "n" and t)
                   if data["ceilings"] else "no matmul ceiling measured") + " (same run)",
           ""]
    if meta["device_type"] != "cuda":
        out += ["**CPU run.** The numbers below are CPU numbers; fastbert's Triton kernels need a CUDA GPU "
                "and are not measured here.", ""]
    if data.get("status") != "complete":
        out += [f"**Incomplete run** ({data.get('status')}).", ""]
    rows = model_rows(data)
    if rows:
        out += ["## Model", "", "Useful TFLOP/s count real tokens only; speed-up is the competitor's time over "
                "fastbert's; errors are the max over real tokens.", "", _md_table(MODEL_HEAD, rows), ""]
    rows = op_rows(data)
    if rows:
        out += ["## Ops", "", _md_table(OP_HEAD, rows), ""]
    if data["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    if chart_name:
        out += [f"![speed-ups]({chart_name})", ""]
    return "\n".join(out)


def text_table(data) -> str:
    """The plain table printed at the end of a run."""
    def render(head, rows):
        widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
        return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows)
    parts = []
    rows = [r[:10] for r in model_rows(data)]
    if rows:
        parts.append(render(MODEL_HEAD[:10], rows))
    rows = op_rows(data)
    if rows:
        parts.append(render(OP_HEAD, rows))
    if data["notes"]:
        parts.append("notes:\n" + "\n".join(f"  - {n}" for n in data["notes"]))
    return "\n\n".join(parts) if parts else "no measurements"


def chart(data, path: str) -> bool:
    """Speed-up bars: fastbert over eager per op case, and over each competitor per workload."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops = [s for s in data["speedups"] if s["suite"] != "model" and s["vs"] == "eager"]
    model = [s for s in data["speedups"] if s["suite"] == "model"]
    panels = [p for p in (("ops: fastbert over eager PyTorch", ops), ("model: fastbert over each competitor", model)) if p[1]]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 4.5 * len(panels)), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], panels):
        if rows is ops:
            labels = [f"{s['name']}\n{s['case']} {s['mode']}" for s in rows]
            ax.bar(range(len(rows)), [s["speedup"] for s in rows], color="tab:blue")
            ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
        else:
            names = list(dict.fromkeys(s["name"] for s in rows))
            rivals = list(dict.fromkeys(s["vs"] for s in rows))
            width = 0.8 / len(rivals)
            for j, rival in enumerate(rivals):
                xs, ys = [], []
                for i, name in enumerate(names):
                    for s in rows:
                        if s["name"] == name and s["vs"] == rival:
                            xs.append(i + (j - (len(rivals) - 1) / 2) * width)
                            ys.append(s["speedup"])
                ax.bar(xs, ys, width, label=f"vs {rival}")
            ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("speed-up (×)")
        ax.set_title(title)
    meta = data["meta"]
    fig.suptitle(f"fastbert on {meta['device']} ({meta['date']}, {meta['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(data, out_dir: str, with_chart: bool) -> Dict[str, str]:
    """Write the JSON and Markdown (and the chart) and return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = file_stem(data["meta"])
    data["speedups"] = speedups(data["measurements"])
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    chart_name = None
    if with_chart:
        try:
            if chart(data, os.path.join(out_dir, stem + ".png")):
                paths["png"] = os.path.join(out_dir, stem + ".png")
                chart_name = stem + ".png"
        except Exception as exc:  # no matplotlib, or a backend problem: the numbers still get written
            note = f"chart not written ({type(exc).__name__}: {exc})"
            if note not in data["notes"]:
                data["notes"].append(note)
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(data, chart_name))
    return paths


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print(text_table(json.load(f)))
