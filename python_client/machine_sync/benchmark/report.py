"""Turn a :class:`BenchResult` into headline ratios, a markdown report and a chart."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .contention import HotCell, OpsCell
from .runner import BenchResult, BulkCell, Cell
from .workloads import WORKLOADS

SHORT = {
    "legacy-autocommit": "legacy 2 autocommit",
    "legacy-autocommit-rev": "legacy 2 autocommit (state first)",
    "legacy-transaction": "legacy 1 transaction",
    "stored-procedure": "stored procedure",
    "machine-sync": "machine-sync",
    "minimal-trigger": "minimal trigger (reference)",
    "floor": "floor (no trigger)",
}
SYNC = "machine-sync"
MINIMAL = "minimal-trigger"
HOT_SHORT = {
    "legacy-compat": "legacy pair, migrated tables (compat)",
    "legacy-twins": "legacy pair, legacy tables",
    "machine-sync": "machine-sync single UPDATE",
}


@dataclass(frozen=True)
class Headline:
    """One target: the measured median ratio per (driver, machines) and whether it holds."""

    target: str
    goal: str  # e.g. ">= 1.80"; "reference" for a comparison without a goal
    values: Mapping[str, float]  # "pgbench 10 000" -> ratio (a Ratio: median and middle half)
    met: bool | None  # None: a reference, nothing to meet


def _group_key(cell: Cell) -> tuple[str, str, int, int, float]:
    return (cell.section, cell.driver, cell.machines, cell.clients, cell.latency_ms)


def _groups(cells: Sequence[Cell]) -> dict[tuple[str, str, int, int, float], dict[str, Cell]]:
    groups: dict[tuple[str, str, int, int, float], dict[str, Cell]] = {}
    for cell in cells:
        groups.setdefault(_group_key(cell), {})[cell.workload] = cell
    return groups


class Ratio(float):
    """A median of per-round ratios, carrying the middle half of them (``low`` to ``high``).

    A float, so it compares and formats as the median; with fewer than four
    rounds there is no middle half to speak of, and ``low``/``high`` are None.
    """

    low: float | None
    high: float | None

    def __new__(cls, pairs: Sequence[float]) -> Ratio:
        ratio = super().__new__(cls, statistics.median(pairs) if pairs else float("nan"))
        quartiles = statistics.quantiles(pairs, n=4) if len(pairs) >= 4 else None
        ratio.low, ratio.high = (quartiles[0], quartiles[2]) if quartiles else (None, None)
        return ratio


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> Ratio:
    """Median over rounds of a[r] / b[r]: each round's pair ran back to back."""
    return Ratio([x / y for x, y in zip(a, b, strict=False) if y > 0])


def _middle_half(value: float) -> tuple[float, float] | None:
    """The middle half of the rounds' ratios behind ``value``, if it has one."""
    if isinstance(value, Ratio) and value.low is not None and value.high is not None:
        return value.low, value.high
    return None


def _with_spread(value: float) -> str:
    """``0.82x``, and the middle half of the rounds' ratios when there is one."""
    spread = _middle_half(value)
    return f"{value:.2f}x" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")


def _ratio_to(group: dict[str, Cell], other: str, of: str = SYNC) -> Ratio | None:
    """``of``'s throughput over ``other``'s (for the legacy pair: the faster one)."""
    if of not in group:
        return None
    rates = group[of].rates
    if other == "legacy-autocommit":
        legacy = ("legacy-autocommit", "legacy-autocommit-rev")
        pair = [group[k].rates for k in legacy if k in group]
        if not pair:
            return None
        best = [max(values) for values in zip(*pair, strict=False)]
        return paired_ratio(rates, best)
    if other not in group:
        return None
    return paired_ratio(rates, group[other].rates)


def _fmt_machines(n: int) -> str:
    return f"{n:,}".replace(",", " ")


def headlines(result: BenchResult) -> list[Headline]:
    """The targets compared: 1 client on the largest data set, hot machines, client operations."""
    groups = _groups(result.cells)
    largest = max((c.machines for c in result.cells if c.section == "local"), default=0)
    single = {
        f"{d} {_fmt_machines(n)}": g
        for (section, d, n, c, _), g in sorted(groups.items(), key=lambda kv: kv[0])
        if section == "local" and c == 1 and n == largest
    }
    out: list[Headline] = []
    size = _fmt_machines(largest)
    for target, other, goal in (
        (
            f"machine-sync vs legacy autocommit dual write (faster order), 1 client, {size} "
            "machines",
            "legacy-autocommit",
            1.65,
        ),
        (f"machine-sync vs stored procedure, 1 client, {size} machines", "stored-procedure", 0.92),
        (f"machine-sync vs floor (no trigger), 1 client, {size} machines", "floor", 0.88),
    ):
        values = {k: r for k, g in single.items() if (r := _ratio_to(g, other)) is not None}
        if values:
            out.append(Headline(target, f">= {goal:.2f}", values, min(values.values()) >= goal))
    # What the floor goal asks of any trigger mirror here, and what machine-sync's
    # guarantees cost beyond the cheapest one.
    for target, of, other in (
        (
            f"minimal trigger mirror vs floor, 1 client, {size} machines: the most a trigger "
            "that writes a second table reaches here",
            MINIMAL,
            "floor",
        ),
        (
            f"machine-sync vs the minimal trigger mirror, 1 client, {size} machines: what the "
            "rules and the guard cost",
            SYNC,
            MINIMAL,
        ),
    ):
        values = {k: r for k, g in single.items() if (r := _ratio_to(g, other, of=of)) is not None}
        if values:
            out.append(Headline(target, "reference", values, None))
    out += _contended_headlines(result)
    bulk = {(b.workload, b.rows): b for b in result.bulk}
    rows = max((b.rows for b in result.bulk), default=0)
    if (SYNC, rows) in bulk and ("floor", rows) in bulk:
        ratio = paired_ratio(bulk[(SYNC, rows)].seconds, bulk[("floor", rows)].seconds)
        out.append(
            Headline(
                f"bulk {_fmt_machines(rows)}-row UPDATE time, machine-sync vs floor",
                "<= 4.00",
                {f"psycopg {_fmt_machines(rows)} rows": ratio},
                ratio <= 4.0,
            )
        )
    return out


def _hot_groups(result: BenchResult) -> dict[tuple[int, int], dict[str, HotCell]]:
    groups: dict[tuple[int, int], dict[str, HotCell]] = {}
    for cell in result.hot:
        groups.setdefault((cell.clients, cell.machines), {})[cell.workload] = cell
    return groups


def _ops_groups(result: BenchResult) -> dict[int, dict[str, OpsCell]]:
    groups: dict[int, dict[str, OpsCell]] = {}
    for cell in result.ops:
        groups.setdefault(cell.writers, {})[cell.workload] = cell
    return groups


def _hot_ratio(group: dict[str, HotCell], top: str, bottom: str) -> Ratio | None:
    if top not in group or bottom not in group:
        return None
    return paired_ratio(group[top].rates, group[bottom].rates)


def _contended_headlines(result: BenchResult) -> list[Headline]:
    out: list[Headline] = []
    for (clients, machines), group in sorted(_hot_groups(result).items()):
        where = f"{clients} clients, {machines} hot machines"
        for target, top, goal in (
            (
                f"legacy statements in compat vs the same on the legacy tables, {where}",
                "legacy-compat",
                0.80,
            ),
            (f"machine-sync single UPDATE vs the legacy pair, {where}", "machine-sync", 1.5),
        ):
            ratio = _hot_ratio(group, top, "legacy-twins")
            if ratio is not None:
                out.append(Headline(target, f">= {goal:.2f}", {where: ratio}, ratio >= goal))
    values = {
        f"{writers} writer{'s' if writers > 1 else ''}": paired_ratio(
            group["client"].rates, group["legacy-code"].rates
        )
        for writers, group in sorted(_ops_groups(result).items())
        if "client" in group and "legacy-code" in group
    }
    if values:
        out.append(
            Headline(
                "the client's operations vs the legacy code paths (read, check, two writes)",
                ">= 1.50",
                values,
                min(values.values()) >= 1.5,
            )
        )
    return out


def _outcomes(cell: HotCell) -> str:
    if not cell.outcomes:
        return "none"
    return ", ".join(f"{k}: {v}" for k, v in sorted(cell.outcomes.items()))


def _contended_sections(result: BenchResult) -> list[str]:
    lines: list[str] = []
    hot = _hot_groups(result)
    if hot:
        lines += [
            "",
            "## Hot machines: clients sharing a few machines (state changes per second, median)",
            "",
            "Each state change is one of the four legacy events (start, completion, stop, "
            "error), sent to the machine and event of its slot in a global order, so a sequence "
            "the rules allow whenever the clients keep step. A path the rules refused (MS002, "
            "MS003) is counted and not done; a compat write that gave up on its machine's lock "
            "(40001, 55P03) is retried, as a client would, and counted.",
            "",
        ]
        rows = []
        for (clients, machines), group in sorted(hot.items()):
            for key in ("legacy-compat", "legacy-twins", "machine-sync"):
                if key not in group:
                    continue
                cell = group[key]
                ratio = _hot_ratio(group, key, "legacy-twins") if key != "legacy-twins" else None
                rows.append(
                    [
                        str(clients),
                        str(machines),
                        HOT_SHORT[key],
                        f"{cell.median:,.0f}",
                        _ratio(ratio),
                        _outcomes(cell),
                        "-" if cell.drift is None else str(cell.drift),
                    ]
                )
        lines += _table(
            [
                "clients",
                "machines",
                "workload",
                "per second",
                "vs legacy tables",
                "refused / retried",
                "drift",
            ],
            rows,
        )
    ops = _ops_groups(result)
    if ops:
        lines += [
            "",
            "## The client's own operations vs the legacy code paths (operations per second)",
            "",
            "Per machine: start, a second start (refused: busy), completion, a second completion "
            "(refused: not the current run), start, failure, a start (refused: in error), the "
            "operator's reset to idle. The client sends one UPDATE for each, refusals "
            "included (the database's error); the legacy code reads the machine, checks "
            "in Python and writes both tables (a refusal is the read alone). The rates are the "
            "median rates, the ratio is the median of the rounds' ratios: the two need not "
            "divide to it.",
            "",
        ]
        lines += _table(
            [
                "writers",
                "client",
                "legacy code",
                "client / legacy",
                "refused (client, legacy)",
                "drift",
            ],
            [
                [
                    str(writers),
                    f"{g['client'].median:,.0f}" if "client" in g else "-",
                    f"{g['legacy-code'].median:,.0f}" if "legacy-code" in g else "-",
                    _ratio(
                        paired_ratio(g["client"].rates, g["legacy-code"].rates)
                        if "client" in g and "legacy-code" in g
                        else None
                    ),
                    ", ".join(str(g[k].refused) for k in ("client", "legacy-code") if k in g),
                    str(g["client"].drift)
                    if "client" in g and g["client"].drift is not None
                    else "-",
                ]
                for writers, g in sorted(ops.items())
            ],
        )
    return lines


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(result: BenchResult) -> str:
    """The whole report as markdown."""
    meta = result.meta
    settings = meta.get("settings", {})
    durable = settings.get("fsync") == "on" and settings.get("synchronous_commit") == "on"
    durability = (
        "ON (commits wait for the disk, as in production)"
        if durable
        else "NOT fully on: commits are cheaper than in production"
    )
    config = meta.get("config", {})
    fixed = config.get("pgbench_transactions")
    pgbench_runs = (
        f"{fixed} transactions per client a run"
        if fixed
        else "a transaction count sized from the round before to last about as long"
    )
    lines = [
        "# machine-sync bench",
        "",
        f"- Server: {meta.get('server')} (PostgreSQL {settings.get('server_version', '?')}), "
        f"fsync={settings.get('fsync')}, synchronous_commit={settings.get('synchronous_commit')}, "
        f"full_page_writes={settings.get('full_page_writes')}: durability "
        f"{durability}.",
        f"- Where: {meta.get('scratch')}; the real migrations applied there, so the real triggers "
        "are measured. Twin tables without triggers for the legacy, stored-procedure and floor "
        "workloads, and a twin pair whose one trigger only copies into the second table for the "
        "minimal-trigger reference.",
        f"- Machine: {meta.get('cpus')} CPUs, {meta.get('platform')}; Python {meta.get('python')}, "
        f"psycopg {meta.get('psycopg')}, pgbench {meta.get('pgbench')}.",
        f"- Method: {config.get('rounds')} rounds of {config.get('seconds')} s per workload "
        f"(after one unrecorded warm-up; pgbench: {pgbench_runs}; through the proxy "
        f"{config.get('network_rounds')} rounds of {config.get('network_seconds')} s; bulk: "
        f"{config.get('bulk_rounds')} rounds, no warm-up), workloads interleaved and rotated each "
        "round; figures are medians; a ratio is the median of the per-round ratios. Every run's "
        "row updates were checked against the server's statistics, and drift counted after every "
        "group.",
        f"- Command: `{meta.get('command') or 'machine-sync bench'}` ({meta.get('started')})",
        "",
        "## Headline (local connection, median ratios)",
        "",
    ]
    shown = headlines(result)
    if any(_middle_half(v) for h in shown for v in h.values.values()):
        lines += [
            "In brackets, the middle half of the rounds' ratios (first to third quartile): how "
            "far one round's comparison strays. The median is what the goal is checked against.",
            "",
        ]
    else:
        lines += [
            "Too few rounds for a middle half (as with --quick): a smoke test of the benchmark, "
            "whose verdicts say nothing about the goals. Run it without --quick to measure.",
            "",
        ]
    lines += _table(
        ["target", "goal", "measured (median ratio)", "met"],
        [
            [
                h.target,
                h.goal,
                ", ".join(f"{k}: {_with_spread(v)}" for k, v in h.values.items()),
                "-" if h.met is None else "yes" if h.met else "**no**",
            ]
            for h in shown
        ],
    )
    lines += ["", "## Single-row state changes per second (median), local connection", ""]
    keys = [w.key for w in WORKLOADS if any(c.workload == w.key for c in result.cells)]
    groups = _groups(result.cells)
    rows = []
    for (section, driver, machines, clients, _), group in sorted(groups.items()):
        if section != "local":
            continue
        rows.append(
            [driver, _fmt_machines(machines), str(clients)]
            + [f"{group[k].median:,.0f}" if k in group else "-" for k in keys]
            + [
                _ratio(_ratio_to(group, other))
                for other in ("legacy-autocommit", "stored-procedure", MINIMAL, "floor")
            ]
        )
    lines += _table(
        [
            "driver",
            "machines",
            "clients",
            *[SHORT[k] for k in keys],
            "sync / legacy",
            "sync / proc",
            "sync / minimal",
            "sync / floor",
        ],
        rows,
    )
    if result.bulk:
        lines += ["", "## Bulk: one statement changes N machines (median ms per statement)", ""]
        bulk = {(b.workload, b.rows): b for b in result.bulk}
        sizes = sorted({b.rows for b in result.bulk})
        names = list(dict.fromkeys(b.workload for b in result.bulk))

        def time_ratio(of: str, size: int) -> str:
            if (of, size) not in bulk or ("floor", size) not in bulk:
                return "-"
            return _ratio(paired_ratio(bulk[(of, size)].seconds, bulk[("floor", size)].seconds))

        lines += _table(
            [
                "rows",
                *[SHORT[n] for n in names],
                "sync / floor (time)",
                "minimal / floor (time)",
            ],
            [
                [_fmt_machines(size)]
                + [f"{bulk[(n, size)].median * 1000:.2f}" for n in names]
                + [time_ratio(SYNC, size), time_ratio(MINIMAL, size)]
                for size in sizes
            ],
        )
    network = [(k, g) for k, g in sorted(groups.items()) if k[0] == "network"]
    if network:
        lines += ["", "## Through a delaying proxy: state changes per second (median)", ""]
        lines += _table(
            ["added RTT", "measured SELECT 1", "clients", *[SHORT[k] for k in keys]],
            [
                [
                    f"{latency:g} ms",
                    f"{result.rtt_ms.get(latency, float('nan')):.2f} ms",
                    str(clients),
                ]
                + [f"{group[k].median:,.0f}" if k in group else "-" for k in keys]
                for (_, _, _, clients, latency), group in network
            ],
        )
        lines += ["", "## Round trips per state change (measured at the proxy)", ""]
        trips: dict[str, list[float]] = {}
        for _, group in network:
            for key, cell in group.items():
                if cell.round_trips is not None:
                    trips.setdefault(key, []).append(cell.round_trips)
        lines += _table(
            ["workload", "round trips"],
            [[SHORT[k], f"{statistics.median(trips[k]):.2f}"] for k in keys if k in trips],
        )
    lines += _contended_sections(result)
    lines += ["", "## Checks", ""]
    every: list[Cell | BulkCell] = [*result.cells, *result.bulk]
    bad = [c for c in every if not c.writes_ok]
    drift = [(c.workload, c.drift) for c in [*every, *result.hot, *result.ops] if c.drift]
    lines.append(
        f"- Row updates as expected (none missing, none stray) in {len(every) - len(bad)} of "
        f"{len(every)} measured cells."
    )
    lines.append(
        "- Drift after every group: "
        + (
            "none (0 disagreeing machines)"
            if not drift
            else ", ".join(f"{workload}: {count}" for workload, count in drift)
        )
    )
    hot = _hot_ratios(result.cells)
    if hot:
        lines.append(
            "- HOT share of row updates (local): "
            + ", ".join(f"{SHORT[k]} {v:.0%}" for k, v in hot.items())
        )
    return "\n".join(lines) + "\n"


def _hot_ratios(cells: Sequence[Cell]) -> dict[str, float]:
    totals: dict[str, tuple[int, int]] = {}
    for cell in cells:
        if cell.section != "local":
            continue
        hot, seen = totals.get(cell.workload, (0, 0))
        share = cell.ops * len(_writes(cell.workload))
        totals[cell.workload] = (hot + cell.hot_updates, seen + share)
    return {k: h / n for k, (h, n) in totals.items() if n}


def _writes(key: str) -> tuple[str, ...]:
    return next(w.writes for w in WORKLOADS if w.key == key)


def headline_text(result: BenchResult) -> str:
    """The headline ratios as plain lines, for the terminal."""
    lines = []
    for h in headlines(result):
        values = ", ".join(f"{k} {_with_spread(v)}" for k, v in h.values.items())
        verdict = "REF " if h.met is None else "MET " if h.met else "MISS"
        lines.append(f"{verdict} {h.target} (goal {h.goal}): {values}")
    return "\n".join(lines)


def chart(result: BenchResult, path: Path) -> bool:
    """Draw the PNG chart; False when matplotlib is not installed (extra ``bench``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = _groups(result.cells)
    keys = [w.key for w in WORKLOADS if any(c.workload == w.key for c in result.cells)]
    largest = max((c.machines for c in result.cells if c.section == "local"), default=0)
    drivers = sorted({c.driver for c in result.cells if c.section == "local"})
    panels = (
        len(drivers)
        + (1 if result.bulk else 0)
        + (1 if result.rtt_ms else 0)
        + (1 if result.hot or result.ops else 0)
    )
    cols = 2 if panels > 1 else 1
    rows = (panels + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows + 0.6), squeeze=False)
    axes = [list(grid.flat)]
    for unused in axes[0][panels:]:
        unused.set_visible(False)
    colors = dict(zip(keys, plt.get_cmap("tab10").colors, strict=False))  # type: ignore[attr-defined]

    def bars(
        ax: Any,
        labels: list[str],
        data: dict[str, list[float]],
        title: str,
        ylabel: str,
        log: bool = False,
    ) -> None:
        width = 0.8 / max(len(keys), 1)
        for i, key in enumerate(keys):
            xs = [x + (i - (len(keys) - 1) / 2) * width for x in range(len(labels))]
            ax.bar(xs, data[key], width, label=SHORT[key], color=colors[key])
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")

    def median_of(group: tuple[str, str, int, int, float], key: str) -> float:
        cell = groups.get(group, {}).get(key)
        return cell.median if cell is not None else 0.0

    panel = 0
    for driver in drivers:
        clients = sorted(
            {
                c.clients
                for c in result.cells
                if c.section == "local" and c.driver == driver and c.machines == largest
            }
        )
        bars(
            axes[0][panel],
            [f"{c} client{'s' if c > 1 else ''}" for c in clients],
            {k: [median_of(("local", driver, largest, c, 0.0), k) for c in clients] for k in keys},
            f"{driver}: state changes/s, {_fmt_machines(largest)} machines",
            "per second",
        )
        panel += 1
    if result.bulk:
        bulk = {(b.workload, b.rows): b for b in result.bulk}
        sizes = sorted({b.rows for b in result.bulk})
        bars(
            axes[0][panel],
            [f"{_fmt_machines(s)} rows" for s in sizes],
            {
                k: [bulk[(k, s)].median * 1000 if (k, s) in bulk else 0.0 for s in sizes]
                for k in keys
            },
            "bulk: ms per statement (lower is better)",
            "ms",
            log=True,
        )
        panel += 1
    if result.rtt_ms:
        latencies = sorted(result.rtt_ms)
        proxied = sorted({c.clients for c in result.cells if c.section == "network"})[:1]
        bars(
            axes[0][panel],
            [f"+{lat:g} ms RTT" for lat in latencies],
            {
                k: [
                    median_of(("network", "psycopg", largest, n, lat), k)
                    for lat in latencies
                    for n in proxied
                ]
                for k in keys
            },
            "through the delaying proxy, psycopg",
            "per second",
            log=True,
        )
        panel += 1
    if result.hot or result.ops:
        _contended_panel(axes[0][panel], result)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _contended_panel(ax: Any, result: BenchResult) -> None:
    """Hot machines and the client's operations: each bar against its legacy baseline."""
    labels: list[str] = []
    ours: list[float] = []
    legacy: list[float] = []
    for (clients, machines), group in sorted(_hot_groups(result).items()):
        base = group.get("legacy-twins")
        for key, name in (("legacy-compat", "legacy in compat"), ("machine-sync", "single UPDATE")):
            if key in group and base is not None:
                labels.append(f"{name}\n{clients}x{machines} hot")
                ours.append(group[key].median)
                legacy.append(base.median)
    for writers, ops in sorted(_ops_groups(result).items()):
        if "client" in ops and "legacy-code" in ops:
            labels.append(f"client ops\n{writers} writer{'s' if writers > 1 else ''}")
            ours.append(ops["client"].median)
            legacy.append(ops["legacy-code"].median)
    xs = list(range(len(labels)))
    ax.bar([x - 0.2 for x in xs], ours, 0.4, label="_machine-sync", color="tab:purple")
    ax.bar([x + 0.2 for x in xs], legacy, 0.4, label="_legacy baseline", color="tab:gray")
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_title("contended: machine-sync side (purple) vs legacy baseline (grey)", fontsize=10)
    ax.set_ylabel("per second")


def write(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.json and (with matplotlib) report.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "json": out_dir / "report.json"}
    paths["markdown"].write_text(markdown(result))
    paths["json"].write_text(json.dumps(result.to_json(), indent=1, default=str) + "\n")
    png = out_dir / "report.png"
    if chart(result, png):
        paths["chart"] = png
    return paths
