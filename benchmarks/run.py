"""Run every benchmark, then write the reports: ``benchmarks/results/summary.md``
(all tables, the targets next to the measured values), the JSON of each benchmark,
and PNG plots. ``bench.sh`` calls this; ``--quick`` takes about 7 minutes, the full run
about 40 (10 of them the soak, 7-8 the comparison with llama-server; building
llama-server the first time adds about 7 more on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine

BENCHMARKS = ("core", "broker", "engine", "llama_server", "http", "cluster", "prefix", "soak")


def run_all(quick: bool, only: list[str]) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for name in only:
        started = time.monotonic()
        argv = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if quick else [])
        print(f"== {name} ==", flush=True)
        subprocess.run(argv, check=True)
        seconds[name] = round(time.monotonic() - started, 1)
    return seconds


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def plots() -> list[Path]:
    """Latency percentiles against load (cluster), throughput against concurrency
    (engine) and every process's RSS over the soak; ``[]`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    cluster = load("cluster")
    if cluster:
        engines = sorted({row["engine"] for row in cluster["rows"]})
        figure, axes = plt.subplots(1, len(engines), figsize=(6 * len(engines), 4.5), squeeze=False)
        for axis, engine in zip(axes[0], engines, strict=True):
            for policy, style, color in (
                ("slots", "-", "tab:blue"),
                ("round-robin", "--", "tab:red"),
            ):
                rows = [
                    r for r in cluster["rows"] if r["engine"] == engine and r["policy"] == policy
                ]
                loads = [r["load"] * 100 for r in rows]
                for percentile, marker in (("p50", "o"), ("p90", "s"), ("p99", "^")):
                    axis.plot(
                        loads,
                        [r["ttft"][f"{percentile}_ms"] for r in rows],
                        style,
                        color=color,
                        marker=marker,
                        label=f"{policy} TTFT {percentile}",
                    )
            axis.set_yscale("log")
            axis.set_xlabel("offered load (% of capacity)")
            axis.set_ylabel("time to first token (ms)")
            axis.set_title(f"{engine} agents (1, 2, 4 slots)")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
        figure.tight_layout()
        path = RESULTS / "cluster_latency.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    engine = load("engine")
    if engine:
        figure, axis = plt.subplots(figsize=(6, 4.5))
        concurrency = [r["concurrency"] for r in engine["rows"]]
        for key, label in (
            ("bare", "bare llama_decode loop"),
            ("engine", "paddler engine"),
            ("broker", "through the broker"),
            ("serial", "serial Llama"),
        ):
            axis.plot(
                concurrency,
                [r[key]["tokens_per_s"] for r in engine["rows"]],
                marker="o",
                label=label,
            )
        axis.set_xlabel("concurrent requests")
        axis.set_ylabel("aggregate tokens/s")
        axis.set_title(f"decode throughput, {engine['model_parameters']} test model")
        axis.grid(True, alpha=0.3)
        axis.legend()
        figure.tight_layout()
        path = RESULTS / "engine_throughput.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    soak = load("soak")
    if soak:
        figure, axis = plt.subplots(figsize=(8, 4.5))
        for name, points in sorted(soak["samples"].items()):
            axis.plot([t / 60 for t, _ in points], [rss / 1024 for _, rss in points], label=name)
        axis.axvspan(0, soak["plan"]["warmup_s"] / 60, color="grey", alpha=0.15, label="warm-up")
        axis.set_xlabel("minutes of mixed load")
        axis.set_ylabel("RSS (MB)")
        axis.set_title(f"soak: RSS of every process at {soak['load']:.0%} of capacity")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7, loc="center right")
        figure.tight_layout()
        path = RESULTS / "soak_rss.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def summary(seconds: dict[str, float], images: list[Path], quick: bool) -> str:
    facts = machine()
    parts = [
        "# paddler benchmark summary",
        "",
        f"{facts['time']}, commit {facts['commit']}, Python {facts['python']}, "
        f"{facts['cpus']} CPUs, {facts['platform']}; libzmq {facts['libzmq']}. "
        f"{'Quick run.' if quick else 'Full run.'} Ratios and percentiles measured side by "
        "side in one run; absolute numbers move with the machine.",
        "",
    ]
    for name in BENCHMARKS:
        result = load(name)
        if result:
            parts.append(result["summary_markdown"])
    if images:
        parts += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    if seconds:
        parts += ["Run time: " + ", ".join(f"{k} {v} s" for k, v in seconds.items()), ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the summary and plots from the existing results",
    )
    args = parser.parse_args()
    seconds = {} if args.report_only else run_all(args.quick, args.only)
    images = plots()
    text = summary(seconds, images, args.quick)
    path = RESULTS / "summary.md"
    path.write_text(text)
    print(text)
    print(f"written {path}")


if __name__ == "__main__":
    main()
