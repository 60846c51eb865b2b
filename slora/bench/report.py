"""A session's results on disk: result.json, results.md, PNG plots and headline.json.

`headline.json` holds the device, commit, date, model and the issue's six figures (the sixth, SLO
attainment and p99 TTFT against rate, is a plot: its file name), each null with a reason when
this result has no run that measures it. Ratios compare `throughput_req_s` of two runs on the same
requests; a figure taken from a time-capped run says so in `notes`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
from pathlib import Path

import torch

PLOT_THROUGHPUT = "throughput_vs_adapters.png"
PLOT_SLO = "slo_vs_rate.png"

TARGETS = {
    "throughput_ratio_vs_base_n1000": 0.85,
    "throughput_ratio_vs_peft_n100": 20.0,
    "throughput_ratio_n2000_vs_n100": 0.9,
    "decode_bandwidth_fraction": 0.6,
    "online_n1000_r20_throughput": 19.0,
    "online_n1000_r20_slo_attainment": 0.9,
}


# --- identity of a run ----------------------------------------------------------------------------

def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def current_commit(explicit: str | None = None) -> str:
    """`explicit`, else $SLORA_COMMIT, else read from .git without running git, else "unknown"."""
    if explicit:
        return explicit
    if os.environ.get("SLORA_COMMIT"):
        return os.environ["SLORA_COMMIT"]
    for parent in Path(__file__).resolve().parents:
        git = parent / ".git"
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = Path(git.read_text().split(":", 1)[1].strip())
        if not git.is_dir():
            continue
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:12]
        ref = head.split(" ", 1)[1]
        common = Path((git / "commondir").read_text().strip()) if (git / "commondir").exists() else None
        for root in filter(None, (git, (git / common) if common else None)):
            if (root / ref).is_file():
                return (root / ref).read_text().strip()[:12]
            packed = root / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0][:12]
        return "unknown"
    return "unknown"


def default_output_dir(device: str, commit: str, date: str | None = None) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"
    return Path("bench") / "results" / f"{date or today()}-{slug}-{commit[:12]}"


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")


# --- headline ---------------------------------------------------------------------------------------

def find_run(runs: list[dict], system: str, mode: str, num_adapters: int | None = None,
             request_rate: float | None = None) -> dict | None:
    for run in runs:
        if run.get("status") != "ok" or run["system"] != system or run["mode"] != mode:
            continue
        if num_adapters is not None and run["num_adapters"] != num_adapters:
            continue
        if request_rate is not None and (run.get("request_rate") is None
                                         or abs(run["request_rate"] - request_rate) > 1e-9):
            continue
        return run
    return None


def _throughput(run: dict | None) -> float | None:
    return None if run is None else run.get("metrics", {}).get("throughput_req_s")


def _why_missing(runs: list[dict], system: str, mode: str, n: int | None, rate: float | None = None) -> str:
    for run in runs:
        if run["system"] == system and run["mode"] == mode and (n is None or run["num_adapters"] == n) \
                and (rate is None or run.get("request_rate") == rate) and run.get("status") != "ok":
            return f"{system} {mode} n={n}: {run['status']}: {run.get('reason')}"
    where = f"{system} {mode}" + (f" n={n}" if n is not None else "") + (f" R={rate}" if rate else "")
    return f"no run of {where} in this result"


def headline(runs: list[dict], meta: dict, plots: list[str]) -> dict:
    figures: dict[str, float | str | None] = {}
    reasons: dict[str, str] = {}
    notes: list[str] = []

    def ratio(key: str, top: tuple, bottom: tuple) -> None:
        a, b = find_run(runs, *top), find_run(runs, *bottom)
        ta, tb = _throughput(a), _throughput(b)
        if ta is None or not tb:
            figures[key] = None
            reasons[key] = "; ".join(_why_missing(runs, *spec) for spec, run in ((top, a), (bottom, b)) if run is None) \
                or "a throughput of zero"
            return
        figures[key] = round(ta / tb, 4)
        capped = [f"{r['system']} n={r['num_adapters']}" for r in (a, b) if r.get("metrics", {}).get("truncated")]
        if capped:
            notes.append(f"{key}: time-capped run(s) {', '.join(capped)}: throughput in request-equivalents")

    ratio("throughput_ratio_vs_base_n1000", ("slora", "offline", 1000), ("base-only", "offline", 1000))
    ratio("throughput_ratio_vs_peft_n100", ("slora", "offline", 100), ("peft", "offline", 100))
    ratio("throughput_ratio_n2000_vs_n100", ("slora", "offline", 2000), ("slora", "offline", 100))

    probe = next((r for r in runs if r["mode"] == "decode-probe" and r["system"] == "slora"
                  and r.get("status") == "ok"), None)
    if probe is not None and probe.get("roofline", {}).get("bandwidth_fraction_at_largest_batch") is not None:
        roof = probe["roofline"]
        figures["decode_bandwidth_fraction"] = round(roof["bandwidth_fraction_at_largest_batch"], 4)
        notes.append(f"decode_bandwidth_fraction: batch {roof['largest_batch']}, n={probe['num_adapters']}, "
                     f"step {roof['step_ms_at_largest_batch']:.2f} ms vs floor {roof['floor_ms_at_largest_batch']:.2f} ms")
    else:
        figures["decode_bandwidth_fraction"] = None
        reasons["decode_bandwidth_fraction"] = _why_missing(runs, "slora", "decode-probe", None)

    online = find_run(runs, "slora", "online", 1000, 20.0)
    if online is None:
        figures["online_n1000_r20_throughput"] = figures["online_n1000_r20_slo_attainment"] = None
        reasons["online_n1000_r20_throughput"] = reasons["online_n1000_r20_slo_attainment"] = \
            _why_missing(runs, "slora", "online", 1000, 20.0)
    else:
        metrics = online["metrics"]
        steady = metrics.get("steady_throughput_req_s")
        figures["online_n1000_r20_throughput"] = round(steady if steady is not None else metrics["throughput_req_s"], 4)
        figures["online_n1000_r20_slo_attainment"] = round(metrics.get("slo_attainment") or 0.0, 4)
        notes.append(f"online n=1000 R=20: {online['workload']['span_s']:.0f} s of arrivals "
                     f"({online['workload']['num_requests']} requests); throughput is the completion rate while "
                     f"requests arrive (after the first quarter); finished / (last finish - first arrival), "
                     f"S-LoRA's measure, is {metrics['throughput_req_s']:.2f} req/s"
                     + (" (time-capped: request-equivalents)" if metrics.get("truncated") else ""))
    figures["slo_vs_rate_plot"] = PLOT_SLO if PLOT_SLO in plots else None
    if figures["slo_vs_rate_plot"] is None:
        rates: dict[tuple, set] = {}
        for run in runs:
            if run["mode"] == "online" and run.get("status") == "ok":
                rates.setdefault((run["system"], run["num_adapters"]), set()).add(run["request_rate"])
        reasons["slo_vs_rate_plot"] = ("not plotted (see notes)" if any(len(v) >= 2 for v in rates.values())
                                       else "fewer than two online rates measured for any system")
    met = {k: (None if figures.get(k) is None else figures[k] >= target) for k, target in TARGETS.items()}
    return {k: meta[k] for k in ("device", "commit", "date", "model")} | figures | {
        "targets": TARGETS, "met": met, "reasons": reasons, "notes": notes + meta.get("notes", []),
    }


# --- files ------------------------------------------------------------------------------------------

def write_outputs(output: str | Path, meta: dict, runs: list[dict], plots: bool = True) -> dict:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        try:
            written = make_plots(output, runs)
        except ImportError as error:  # matplotlib missing: every number is still written
            meta = meta | {"notes": meta.get("notes", []) + [f"no plots: {error}"]}
    head = headline(runs, meta, written)
    (output / "result.json").write_text(json.dumps({"meta": meta, "headline": head, "runs": runs}, indent=2,
                                                   default=_json_default))
    (output / "headline.json").write_text(json.dumps(head, indent=2, default=_json_default))
    (output / "results.md").write_text(markdown(meta, head, runs, written))
    return head


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _fmt(value, digits: int = 2, scale: float = 1.0) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value * scale:.{digits}f}"
    return str(value)


def markdown(meta: dict, head: dict, runs: list[dict], plots: list[str]) -> str:
    lines = [f"# slora benchmark: {meta['date']}, {meta['device']}, commit {meta['commit']}", "",
             f"Model `{meta['model']}` ({meta.get('dtype')}), kernels `{meta.get('backend') or 'default'}`, "
             f"copy bandwidth {meta.get('copy_bandwidth_bytes_s', 0) / 1e9:.0f} GB/s (read + write).", ""]
    lines += ["## Headline", "", "| figure | value | target | met | note |", "|---|---|---|---|---|"]
    for key, target in TARGETS.items():
        lines.append(f"| {key} | {_fmt(head.get(key), 3)} | >= {target:g} | {_fmt(head['met'].get(key))} "
                     f"| {head['reasons'].get(key, '')} |")
    lines.append(f"| slo_vs_rate_plot | {head.get('slo_vs_rate_plot') or '–'} | plotted | "
                 f"{'yes' if head.get('slo_vs_rate_plot') else 'no'} | {head['reasons'].get('slo_vs_rate_plot', '')} |")
    lines += ["", "## Runs", "",
              "| system | mode | adapters | rate | status | req/s | steady req/s | out tok/s | TTFT p50 s | TTFT p99 s | ITL p50 ms "
              "| e2e p99 s | SLO | mean batch | decode step ms | roofline frac |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        m, s, r = run.get("metrics", {}), run.get("steps", {}), run.get("roofline", {})
        status = run["status"] + (" (capped)" if m.get("truncated") else "")
        if run["status"] != "ok":
            status += f": {run.get('reason')}"
        lines.append(
            f"| {run['system']} | {run['mode']} | {run['num_adapters']} | {_fmt(run.get('request_rate'), 1)} "
            f"| {status} | {_fmt(m.get('throughput_req_s'))} | {_fmt(m.get('steady_throughput_req_s'))} "
            f"| {_fmt(m.get('output_tok_s'), 0)} "
            f"| {_fmt(m.get('ttft_s_p50'))} | {_fmt(m.get('ttft_s_p99'))} | {_fmt(m.get('itl_s_p50'), 1, 1e3)} "
            f"| {_fmt(m.get('latency_s_p99'))} | {_fmt(m.get('slo_attainment'))} | {_fmt(s.get('mean_batch_seqs'), 1)} "
            f"| {_fmt(s.get('decode_step_ms_p50'))} | {_fmt(r.get('bandwidth_fraction_at_largest_batch'))} |")
    lines += ["", "## Notes", ""] + [f"- {note}" for note in head["notes"]]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def make_plots(output: Path, runs: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    offline = [r for r in runs if r["mode"] == "offline" and r.get("status") == "ok"]
    if offline:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for system in sorted({r["system"] for r in offline}):
            points = sorted((r["num_adapters"], r["metrics"]["throughput_req_s"]) for r in offline
                            if r["system"] == system)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("adapters")
        ax.set_ylabel("throughput (req/s)")
        ax.set_ylim(bottom=0)
        ax.set_title("Offline throughput vs number of adapters")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(output / PLOT_THROUGHPUT, dpi=120)
        plt.close(fig)
        written.append(PLOT_THROUGHPUT)
    online = [r for r in runs if r["mode"] == "online" and r.get("status") == "ok"]
    series: dict[str, list[dict]] = {}
    for r in online:
        series.setdefault(f"{r['system']} n={r['num_adapters']}", []).append(r)
    if any(len({r["request_rate"] for r in group}) >= 2 for group in series.values()):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for name, group in sorted(series.items()):
            group = sorted(group, key=lambda r: r["request_rate"])
            rates = [r["request_rate"] for r in group]
            left.plot(rates, [r["metrics"].get("slo_attainment") for r in group], marker="o", label=name)
            right.plot(rates, [r["metrics"].get("ttft_s_p99") for r in group], marker="o", label=name)
        slo = online[0]["metrics"].get("slo_ttft_s")
        left.set_title(f"SLO attainment (first token within {slo:g} s)" if slo else "SLO attainment")
        left.set_ylim(-0.02, 1.02)
        right.set_title("p99 time to first token")
        right.set_ylabel("seconds")
        right.set_yscale("log")
        for ax in (left, right):
            ax.set_xlabel("request rate (req/s)")
            ax.grid(alpha=0.3)
        left.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(output / PLOT_SLO, dpi=120)
        plt.close(fig)
        written.append(PLOT_SLO)
    return written


def make_meta(session, commit: str | None, extra_notes: list[str] | None = None) -> dict:
    o = session.options
    notes = [
        "adapters: random weights, ranks {} on {}, {} distinct weight files per rank; each adapter name is a "
        "distinct adapter to the engine (registered, loaded into the pool and evicted on its own), but names "
        "share files and, with the 'shared' store, packed host copies".format(
            list(o.ranks), "/".join(m.removesuffix("_proj") for m in o.targets), o.adapter_variants),
        "workload: S-LoRA's synthetic generator (popularity, gamma arrivals, uniform lengths); TTFT is "
        "measured from each request's scheduled arrival",
        f"admission: {o.admission} for every engine-based system"
        + (" (S-LoRA's: a request starts only if every running one can reach its max_tokens, here its output "
           "length, so nothing is preempted)" if o.admission == "reserve" else ""),
    ] + list(extra_notes or [])
    return {
        "device": device_name(session.device), "commit": current_commit(commit), "date": today(),
        "model": o.model, "dtype": str(session.dtype).removeprefix("torch."), "backend": o.backend,
        "torch": torch.__version__, "copy_bandwidth_bytes_s": session.copy_bandwidth,
        "session": session.describe(), "notes": notes,
    }
