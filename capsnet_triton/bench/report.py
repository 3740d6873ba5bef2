"""What a run reports: the environment (machine, versions, load), the table printed to stdout,
and the plot of median time per provider."""

import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
from dataclasses import asdict

import numpy as np
import torch

from .runner import MNIST, network_shape
from .workloads import SWEPT, WORKLOADS


def versions():
    """The versions every figure depends on."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "not installed"
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton,
            "numpy": np.__version__, "cuda": torch.version.cuda}


def cpu_name():
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
    return name


def environment(device, bandwidth, args, load_before, plan):
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench.py", *args]),     # quoted: it can be pasted back
        # The plan sets the network every row runs (--tiny's is not MNIST's) and the repetitions.
        "network": network_shape(plan), "plan": asdict(plan),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        # Other processes on the machine skew CPU timings: the 1-minute load before and after.
        "load_average": [load_before, load_average()],
        **versions(),
        "tf32": "off (every provider computes in full float32, as checked)" if device.type == "cuda" else None,
        "copy_bandwidth_gbs": bandwidth,
    }


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _num(value, fmt):
    return format(value, fmt) if value is not None else "-"


def network_text(network):
    """The network shape of a run, and whether it is MNIST's, which the docs' figures are at."""
    text = ", ".join(f"{k} = {v}" for k, v in network.items() if k != "conv_channels")
    text += f", Conv1 {network['conv_channels']} channels"
    if network == MNIST:
        return text + " (the MNIST shape)"
    return text + f" (NOT the MNIST shape: I = {MNIST['I']}, Conv1 {MNIST['conv_channels']} channels)"


def format_table(rows, env, providers):
    lines = [f"CapsNet routing benchmark  {env['date']}",
             f"device {env['device']} | cpu {env['cpu']} ({env['cpu_count']} cores, torch threads "
             f"{env['torch_threads']}) | load average {_num(env['load_average'][0], '.1f')} before, "
             f"{_num(env['load_average'][1], '.1f')} after",
             f"python {env['python']} torch {env['torch']} triton {env['triton']} numpy {env['numpy']}"
             + (f" cuda {env['cuda']} | TF32 {env['tf32']}" if env["cuda"] and env["device"] != "cpu" else ""),
             "copy bandwidth (read + write): "
             + ", ".join(f"{dev} {gbs:.1f} GB/s" for dev, gbs in env["copy_bandwidth_gbs"].items()),
             f"network {network_text(env['network'])}",
             f"command: {env['command']}"]
    width = 1 + max(len(name) for name in ["provider", *(p.name for p in providers), *(r.provider for r in rows)])
    lines += ["providers:"] + [f"  {p.name:<{width}}{p.about}" for p in providers]
    load = env["load_average"][0]
    if load is not None and load + env["torch_threads"] > env["cpu_count"] + 0.5 and env["device"] == "cpu":
        lines += [f"WARNING: load average {load:.1f} before the run on {env['cpu_count']} cores: other processes "
                  "compete for the CPU,", "         and multi-threaded timings can come out many times "
                  "slower, 100x and more (--threads 1 is steadier)"]
    lines.append("")
    header = (f"{'B':>5} {'r':>2}  {'provider':<{width}}{'median ms':>10}{'p25-p75 ms':>21}{'vs eager':>10}"
              f"{'GB/s':>8}{'%copy':>7}{'peak MiB':>10}{'rel.err':>9}")
    routed = {w.name: w.routed for w in WORKLOADS}
    for workload in dict.fromkeys(r.workload for r in rows):
        lines += [f"== {workload} ==", header]
        for row in (r for r in rows if r.workload == workload):
            lead = f"{row.B:>5} {row.r if routed[workload] else '-':>2}  {row.provider:<{width}}"
            if row.status != "ok":
                lines.append(f"{lead}{row.status}: {row.note}" if row.status == "FAILED" else f"{lead}{row.note}")
                continue
            spread = f"{row.p25_ms:.4g}-{row.p75_ms:.4g}"
            lines.append(f"{lead}{row.median_ms:>10.4g}{spread:>21}{_num(row.vs_eager, '.2f') + ('x' if row.vs_eager else ''):>10}"
                         f"{_num(row.gbs, '.1f'):>8}{_num(row.copy_share and 100 * row.copy_share, '.0f'):>7}"
                         f"{_num(row.peak_mib, '.0f'):>10}{row.rel_error:>9.1e}")
        lines.append("")
    eager_run = any(r.provider == "torch-eager" for r in rows)
    lines += ["vs eager: torch-eager's median / this median, same shape; \"-\" where torch-eager has no timed row "
              "at that shape" + ("" if eager_run else " (here everywhere: torch-eager was not among the providers)")
              + ".",
              "r: routing iterations (\"-\" for squash, which has none).  rel.err: against float64 ground truth.",
              "GB/s: the bytes a fused kernel must move / median; %copy: that / the copy bandwidth above.",
              "peak MiB: memory allocated during one call beyond what was allocated before it;",
              "          " + ("on a CPU, the growth of the process's resident memory (its peak, Linux VmHWM)."
                              if env["device"] == "cpu" else "torch.cuda.max_memory_allocated (numpy-ref's: "
                              "the growth of resident memory).")]
    return "\n".join(lines)


def plot_formats():
    """The file extensions (".png", ".svg" ...) matplotlib's savefig can write on this machine:
    PGF only where its TeX program is installed (savefig would fail after the whole run)."""
    import shutil

    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase
    formats = {"." + extension for extension in FigureCanvasBase.get_supported_filetypes()}
    if shutil.which(matplotlib.rcParams["pgf.texsystem"]) is None:
        formats.discard(".pgf")
    return formats


def plot(rows, path, env):
    """Draw figure(rows, env) to `path`, in the format of its extension."""
    fig = figure(rows, env)
    if fig is None:
        print(f"bench: no row was timed, so there is no plot ({path} not written)", file=sys.stderr)
        return
    # "tight" grows the image to hold the legend, placed below the panels.
    fig.savefig(path, dpi=120, bbox_inches="tight")


def figure(rows, env):
    """Median time per provider: one panel per workload over B (at r = 3), and one over r for
    the sweep; None when no row was timed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    timed = [r for r in rows if r.status == "ok"]
    if not timed:
        return None
    swept_batches = {r.B for r in timed if r.workload == SWEPT and r.r != 3}   # the r sweep's batch
    # A panel over B for each workload timed at r = 3 (or without routing), one over r for the sweep.
    panels = ([(w, "B") for w in dict.fromkeys(r.workload for r in timed if r.r in (None, 3))]
              + [(SWEPT, "r")] * bool(swept_batches))
    columns = min(3, len(panels))
    rows_of_panels = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(4.5 * columns, 3.6 * rows_of_panels), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    providers = list(dict.fromkeys(r.provider for r in timed))
    colours = {provider: f"C{k}" for k, provider in enumerate(providers)}   # one colour per provider in every panel
    for ax, (workload, axis) in zip(axes.flat, panels):
        series = {}
        for provider in providers:
            points = sorted((getattr(r, axis), r.median_ms) for r in timed
                            if r.workload == workload and r.provider == provider
                            and (r.r in (None, 3) if axis == "B" else r.B in swept_batches))
            if points:
                series[provider] = points
        if axis == "B" and all(len(points) == 1 for points in series.values()):
            # A workload timed at one batch: bars compare the providers better than lone dots.
            names = list(series)
            ax.barh(names, [series[name][0][1] for name in names], color=[colours[name] for name in names])
            ax.invert_yaxis()
            ax.set(title=f"{workload} (B = {series[names[0]][0][0]})", xlabel="median ms")
            continue
        for provider, points in series.items():
            ax.plot(*zip(*points), marker="o", label=provider, color=colours[provider])
        ax.set(title=workload + (" (r sweep)" if axis == "r" else ""), xlabel=axis, ylabel="median ms", yscale="log")
        if axis == "B":
            ax.set_xscale("log", base=2)
        # Ticks at the measured values, written plainly: 8 and 32, not 2^3 and 2^5; r = 1, 2, 3, not 1.5.
        ticks = sorted({x for points in series.values() for x, _ in points})
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    title = [f"median ms per call, float32, on {env['device']}"
             + (f" ({env['cpu']})" if env["device"] == "cpu" else ""), network_text(env["network"])]
    failed = {}
    for r in rows:
        if r.status == "FAILED":
            failed.setdefault(r.provider, {})[r.workload] = None
    if failed:
        # A provider missing from a panel would otherwise read as one that was never run.
        title.append("FAILED the check, so not drawn: "
                     + "; ".join(f"{provider} ({', '.join(workloads)})" for provider, workloads in failed.items()))
    fig.suptitle("\n".join(title), fontsize=10)
    fig.tight_layout()
    line_panels = [ax for ax in axes.flat if ax.get_lines()]
    if line_panels:                                        # bar panels name providers on their axis
        handles = {label: handle for ax in line_panels for handle, label in zip(*ax.get_legend_handles_labels())}
        # Below the panels, never over their lines.
        fig.legend(handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=(0.5, 0),
                   ncol=min(5, len(handles)), fontsize=8)
    return fig
