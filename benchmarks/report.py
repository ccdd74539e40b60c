"""Turn a run's result document into a table (stdout + markdown), JSON, a PNG chart and the
marked figures section of ``benchmarks/README.md``.

Theory of operation: :func:`markdown` is a pure function of the result document (the dict
``run.py`` builds and ``latest.json`` stores), so the README, ``latest.md`` and stdout show the
same text; :func:`render_png` draws four bar charts (throughput, added latency, CPU per 1k
requests, peak RSS) with matplotlib's Agg backend when matplotlib is installed (it is an
optional extra, see ``requirements.txt``; without it the chart is skipped with a note).
:func:`update_readme` replaces only the text between the two marker comments, so the rest of
the README stays hand-written. JSON and markdown are written to a ``.tmp`` file and renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BEGIN = "<!-- BENCH:RESULTS:BEGIN (written by benchmarks/run.py; do not edit) -->"
END = "<!-- BENCH:RESULTS:END -->"

LABELS = {
    "direct": "direct (no proxy)",
    "meshproxy-1w": "meshproxy, 1 worker",
    "meshproxy-2w": "meshproxy, 2 workers",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "envoy": "Envoy",
}


def _f(value: object, fmt: str = "{:,.0f}", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, (int, float)):
        return fmt.format(value)
    return str(value)


def _x(value: object) -> str:
    if isinstance(value, (int, float)) and 0 < abs(value) < 0.1:
        return _f(value, "{:.3f}x")
    return _f(value, "{:.2f}x")


def _mib(kib: object) -> str:
    return _f(kib / 1024 if isinstance(kib, (int, float)) else None, "{:.1f}")


def peer_table(peers: list[dict]) -> list[str]:
    rows = [
        "| peer | req/s | vs direct | vs Envoy | added p50 µs | added p90 µs | added p99 µs "
        "| p99 vs Envoy | CPU s / 1k req | CPU vs Envoy | RSS idle MiB | RSS peak MiB "
        "| upstream conns (sat / lat) | errors | noise |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in peers:
        label = LABELS.get(r["name"], r["name"])
        if r.get("status") != "ok":
            why = (r.get("error") or "").splitlines()[0][:120] if r.get("error") else ""
            rows.append(f"| {label} | {r.get('status')}: {why} |" + " |" * 14)
            continue
        sat, lat = r["saturation"], r["latency"]
        added = r.get("added_us", {})
        errors = (
            sat.get("non_2xx", 0)
            + sat.get("socket_errors", 0)
            + lat.get("non_2xx", 0)
            + lat.get("errors", 0)
        )
        direct = r["name"] == "direct"
        rows.append(
            "| "
            + " | ".join(
                [
                    label,
                    _f(sat["rps"]),
                    _x(r.get("rps_vs_direct")),
                    _x(r.get("rps_vs_envoy")),
                    "0 (base)" if direct else _f(added.get("p50"), "{:,.0f}"),
                    "0 (base)" if direct else _f(added.get("p90"), "{:,.0f}"),
                    "0 (base)" if direct else _f(added.get("p99"), "{:,.0f}"),
                    "" if direct else _x(r.get("added_p99_vs_envoy")),
                    "" if direct else _f(sat.get("cpu_s_per_1k"), "{:.4f}"),
                    "" if direct else _x(r.get("cpu_vs_envoy")),
                    "" if direct else _mib(r.get("idle", {}).get("rss_kib")),
                    "" if direct else _mib(r.get("peak", {}).get("hwm_kib")),
                    f"{sat.get('upstream_connections')} / {lat.get('upstream_connections')}",
                    str(errors),
                    _f(sat.get("other_cpu_share"), "{:.2f} CPU"),
                ]
            )
            + " |"
        )
    return rows


RELOADS = (
    ("reload_local", "edit one VirtualService"),
    ("reload", "rewrite every VirtualService"),
)
"""The reload scenarios of a big-table result: its key, and the row title."""


def bigtable_lines(big: dict | None) -> list[str]:
    if not big:
        return []
    out = ["", "### Big table: 10 hosts vs many hosts (meshproxy, 1 worker)", ""]
    if big.get("status") != "ok":
        why = (big.get("error") or "").strip().splitlines()
        out.append(f"Not measured: {big.get('status')}: {why[0] if why else ''}")
        return out
    small, large = big["small"], big["large"]
    out += [
        "| table | hosts / routes | start to ready s | req/s | CPU s / 1k req | RSS peak MiB "
        "| upstream conns | noise |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for t in (small, large):
        out.append(
            f"| {t['label']} | {t['hosts']:,} / {t['routes']:,} "
            f"| {_f(t.get('start_seconds'), '{:.2f}')} "
            f"| {_f(t.get('rps'))} | {_f(t.get('cpu_s_per_1k'), '{:.4f}')} "
            f"| {_mib(t.get('peak_hwm_kib'))} | {_f(t.get('upstream_connections'))} "
            f"| {_f(t.get('other_cpu_share'), '{:.2f} CPU')} |"
        )
    ratio = big.get("rps_ratio")
    out.append("")
    out.append(
        f"Big-table throughput is {_f(ratio * 100 if ratio else None, '{:.1f}')}% of the "
        "small table's (target: within 10%)"
        + (
            f"; its CPU per request is {big['cpu_ratio']:.2f}x the small table's (the figure"
            " least affected by other processes)."
            if big.get("cpu_ratio")
            else "."
        )
    )
    rows = [(t, key, title) for t in (small, large) for key, title in RELOADS if t.get(key)]
    if rows:
        out += [
            "",
            "| reload | file write -> admin reports the new version "
            "| file write -> first response from the new config "
            "| longest gap between responses (when, from the write) "
            "| errors / non-2xx |",
            "|---|--:|--:|--:|--:|",
        ]
        for t, key, title in rows:
            r = t[key]
            out.append(
                f"| {t['label']}: {title} "
                f"| {_f(r.get('config_dump_seconds'), '{:.3f}')} s "
                f"| {_f(r.get('data_plane_seconds'), '{:.3f}')} s "
                f"| {_f(r.get('max_gap_ms'), '{:.1f}')} ms "
                f"({_f(r.get('max_gap_after_write_ms'), '{:+,.0f}')} ms) "
                f"| {r.get('errors', '-')} / {r.get('non_2xx', '-')} |"
            )
        out.append("| target | <= 1 s |  | <= 100 ms | 0 |")
        dumps = [t for t in (small, large) if t.get("reload")]
        if dumps:
            cells = []
            for t in dumps:
                r = t["reload"]
                size = r["config_dump_bytes"] / 1024 if r.get("config_dump_bytes") else None
                cells.append(
                    f"{t['label']}: {_f(r.get('config_dump_fetch_seconds'), '{:.3f}')} s / "
                    f"{_mib(size)} MiB / {_f(r.get('config_dump_max_gap_ms'), '{:.1f}')} ms"
                )
            out += [
                "",
                "Whole `/config_dump` after the reloads (time / size / longest gap between "
                f"responses of a client looping over every host meanwhile): {'; '.join(cells)}.",
            ]
        sources = {t[key].get("version_source") for t, key, _ in rows} - {None}
        if sources:
            out += ["", f"Version read from: {', '.join(sorted(sources))}."]
        for t, key, title in rows:
            if t[key].get("note"):
                out += ["", f"Note ({t['label']}, {title}): {t[key]['note']}"]
    return out


def markdown(doc: dict) -> str:
    env = doc.get("environment", {})
    plan = env.get("plan", {})
    pin = env.get("pinning", {})
    peers = doc.get("peers", [])
    direct = next((p for p in peers if p["name"] == "direct" and p.get("status") == "ok"), None)
    lines = [
        f"Run {env.get('date', '?')} on {env.get('cpus', '?')} CPUs ({env.get('cpu_model', '?')}), "
        f"Python {env.get('python', '?')}, commit `{env.get('git', '?')}`"
        f"{' - QUICK run, figures are indicative only' if doc.get('quick') else ''}; "
        f"took {doc.get('elapsed_seconds', '?')} s.",
        "",
        f"Saturation: `wrk -t1 -c{plan.get('sat_connections')} -d{plan.get('sat_seconds')}s` "
        f"(after a {plan.get('sat_warmup')} s warm-up). Latency: open loop at "
        f"{_f(plan.get('lat_rate'))} req/s over {plan.get('lat_connections')} keep-alive "
        f"connections for {plan.get('lat_seconds')} s; *added* = peer minus direct, per "
        "percentile. Pinning: single-worker proxies on CPU "
        f"{pin.get('proxy') or 'any'}, meshproxy 2 workers on CPUs "
        f"{pin.get('proxy_multi_worker') or 'any'}, upstream and load generators on CPU "
        f"{pin.get('load_and_upstream') or 'any'}.",
        "",
        *peer_table(peers),
    ]
    if direct is not None:
        d = direct["latency"]["latency_us"]
        lines += [
            "",
            f"Direct latency at {_f(plan.get('lat_rate'))} req/s (the baseline subtracted "
            f"above): p50 {_f(d['p50'])} µs, p90 {_f(d['p90'])} µs, p99 {_f(d['p99'])} µs.",
        ]
    lines += bigtable_lines(doc.get("bigtable"))
    versions = ", ".join(
        f"{k} `{env[k]}`" for k in ("nginx", "haproxy", "envoy", "wrk") if env.get(k)
    )
    if versions:
        lines += ["", f"Versions: {versions}."]
    return "\n".join(lines) + "\n"


def render_png(doc: dict, path: Path) -> str | None:
    """Draw the chart; returns None on success, else why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -r benchmarks/requirements.txt)"
    ok = [p for p in doc.get("peers", []) if p.get("status") == "ok"]
    if not ok:
        return "no peer was measured"
    names = [LABELS.get(p["name"], p["name"]).replace(", ", "\n") for p in ok]
    colors = ["#888888" if p["name"] == "direct" else "#3b75af" for p in ok]
    for i, p in enumerate(ok):
        if p["name"].startswith("meshproxy"):
            colors[i] = "#e07b39"
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ax = axes[0][0]
    bars = ax.bar(names, [p["saturation"]["rps"] for p in ok], color=colors)
    for bar, p in zip(bars, ok, strict=True):
        noise = p["saturation"].get("other_cpu_share")
        if noise is not None:
            ax.annotate(
                f"noise {noise:.2f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_title("saturation throughput (req/s, higher is better; noise = others' CPU)")
    ax = axes[0][1]
    proxies = [p for p in ok if p["name"] != "direct" and p.get("added_us")]
    width = 0.27
    xs = range(len(proxies))
    for k, q in enumerate(("p50", "p90", "p99")):
        ax.bar(
            [x + (k - 1) * width for x in xs],
            [max(1.0, p["added_us"][q] or 1.0) for p in proxies],
            width,
            label=q,
        )
    ax.set_xticks(list(xs), [LABELS.get(p["name"], p["name"]).replace(", ", "\n") for p in proxies])
    ax.set_yscale("log")  # one peer's stall must not flatten everybody else's bars
    ax.set_title(
        f"added latency at {doc['environment']['plan']['lat_rate']:.0f} req/s (µs, log scale)"
    )
    ax.legend()
    ax = axes[1][0]
    with_cpu = [p for p in ok if p["saturation"].get("cpu_s_per_1k")]
    ax.bar(
        [LABELS.get(p["name"], p["name"]).replace(", ", "\n") for p in with_cpu],
        [p["saturation"]["cpu_s_per_1k"] for p in with_cpu],
        color=[colors[ok.index(p)] for p in with_cpu],
    )
    ax.set_title("CPU seconds per 1,000 requests (lower is better)")
    ax = axes[1][1]
    with_mem = [p for p in ok if p.get("peak")]
    ax.bar(
        [LABELS.get(p["name"], p["name"]).replace(", ", "\n") for p in with_mem],
        [p["peak"]["hwm_kib"] / 1024 for p in with_mem],
        color=[colors[ok.index(p)] for p in with_mem],
    )
    ax.set_title("peak RSS, all processes (MiB)")
    for row in axes:
        for a in row:
            a.tick_params(axis="x", labelsize=8)
            a.grid(axis="y", alpha=0.3)
    title = "meshproxy vs direct, nginx, HAProxy, Envoy"
    if doc.get("quick"):
        title += " (quick run)"
    fig.suptitle(f"{title} - {doc['environment'].get('date', '')}")
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return None


def update_readme(readme: Path, section: str) -> bool:
    """Replace the text between the markers; False when the markers are missing."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return False
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(BEGIN)] + "\n" + section + text[end:]
    _write(readme, new)
    return True


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_all(doc: dict, out: Path, readme: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(doc)
    print()
    print(md)
    _write(out / "latest.json", json.dumps(doc, indent=2, sort_keys=False) + "\n")
    _write(out / "latest.md", md)
    why = render_png(doc, out / "latest.png")
    if why:
        print(f"chart skipped: {why}")
    print(
        f"wrote {out / 'latest.json'}, {out / 'latest.md'}"
        + ("" if why else f", {out / 'latest.png'}")
    )
    if readme is not None:
        if update_readme(readme, md):
            print(f"updated {readme}")
        else:
            print(f"{readme} has no {BEGIN!r} marker; not updated")
