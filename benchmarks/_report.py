"""Outputs of the suite: results.json, results.md, targets.md, time_vs_P.png, docs update."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from _structures import OPERATIONS, default_structures, structure_id

__all__ = ["evaluate_targets", "update_docs", "write_outputs"]

MB = 2**20
KRONECKER_TARGET_P = 256 * 257


# ------------------------------------------------------------------- targets
def _row(rows: list[dict[str, Any]], backend: str, structure: str, p: int, op: str) -> Any:
    for row in rows:
        if (row["backend"], row["structure"], row["P"], row["op"]) == (backend, structure, p, op):
            return row
    return None


def _ratio_target(
    rows: list[dict[str, Any]],
    backend: str,
    ident: str,
    text: str,
    structure: str,
    p: int,
    op: str,
    kind: str,
    threshold: float,
) -> dict[str, Any]:
    row = _row(rows, backend, structure, p, op)
    measured = None if row is None or "time_s" not in row else row[f"ratio_{kind}"]
    detail = ""
    if measured is not None:
        detail = (
            f"structcov {_ms(row['time_s'])}, {kind} {_ms(row[f'{kind}_s'])}"
            f" (P = {p:,}, {row['repeats']} rounds)"
        )
    return _target(ident, text, backend, measured, threshold, detail)


def _target(
    ident: str, text: str, backend: str, measured: float | None, threshold: float, detail: str
) -> dict[str, Any]:
    return {
        "id": ident,
        "target": text,
        "backend": backend,
        "measured": measured,
        "threshold": threshold,
        "met": None if measured is None else bool(measured <= threshold),
        "detail": detail or "not measured",
    }


def evaluate_targets(rows: list[dict[str, Any]], *, smoke: bool) -> list[dict[str, Any]]:
    """The issue's targets, per backend, from the rows of this run (ratios of medians)."""
    big = 10**2 if smoke else 10**6
    kron = 10**2 if smoke else KRONECKER_TARGET_P
    backends = list(dict.fromkeys(row["backend"] for row in rows))
    out: list[dict[str, Any]] = []
    for b in backends:
        out.append(
            _ratio_target(
                rows,
                b,
                "T1",
                f"`sample`, LowRank(32), P = {big:,}, 64 samples / one GEMM",
                "low_rank_r32",
                big,
                "sample",
                "floor",
                1.15,
            )
        )
        out.append(
            _ratio_target(
                rows,
                b,
                "T2",
                f"Kronecker `sample`, full ranks, P = {kron:,} / its two GEMMs",
                "kronecker",
                kron,
                "sample",
                "floor",
                1.2,
            )
        )
        out.append(
            _ratio_target(
                rows,
                b,
                "T3",
                f"diagonal `sample`, P = {big:,} / native `randn * s + m`",
                "diagonal",
                big,
                "sample",
                "native",
                1.2,
            )
        )
        for op in OPERATIONS:
            tiny = [
                r
                for r in rows
                if r["backend"] == b and r["P"] == 100 and r["op"] == op and "time_s" in r
            ]
            if not tiny:
                out.append(_target("T4", f"P = 100 `{op}` / native", b, None, 3.0, ""))
                continue
            worst = max(tiny, key=lambda r: r["ratio_native"])
            ratios = ", ".join(f"{r['structure']} {r['ratio_native']:.2f}" for r in tiny)
            out.append(
                _target(
                    "T4",
                    f"P = 100 `{op}` / native (worst structure)",
                    b,
                    worst["ratio_native"],
                    3.0,
                    f"worst {worst['structure']} ({_us(worst['time_s'])} vs "
                    f"{_us(worst['native_s'])}); all: {ratios}",
                )
            )
        for structure, p in (
            ("low_rank_r32", big),
            ("diagonal", big),
            ("low_rank_plus_diagonal_r64", big),
            ("kronecker", kron),
        ):
            row = _row(rows, b, structure, p, "sample")
            measured = detail = None
            if row is not None and row.get("peak_bytes") is not None:
                needed = row["output_bytes"] + row["z_bytes"]
                measured = row["peak_bytes"] / needed
                native = row.get("native_peak_bytes")
                detail = (
                    f"peak {row['peak_bytes'] / MB:.1f} MB; output {row['output_bytes'] / MB:.1f}"
                    f" MB + z {row['z_bytes'] / MB:.1f} MB"
                    + (f"; native {native / needed:.2f}x" if native is not None else "")
                )
            out.append(
                _target(
                    "T5",
                    f"peak memory of `sample`, {structure}, P = {p:,} / (output + z)",
                    b,
                    measured,
                    1.10,
                    detail or "",
                )
            )
        for op in ("diagonal", "trace", "logdet", "kl"):
            out.append(
                _ratio_target(
                    rows,
                    b,
                    "T6",
                    f"LRPD(64) `{op}`, P = {big:,} / Gram GEMM `U^T D^-1 U`",
                    "low_rank_plus_diagonal_r64",
                    big,
                    op,
                    "floor",
                    1.3,
                )
            )
    return out


# ------------------------------------------------------------------ markdown
def _ms(seconds: float) -> str:
    return _time(seconds)


def _us(seconds: float) -> str:
    return _time(seconds)


def _time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def _p(p: int) -> str:
    exponent = math.log10(p)
    return f"1e{round(exponent)}" if abs(exponent - round(exponent)) < 1e-9 else f"{p:,}"


def _table(header: list[str], body: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if "skipped" in row:
        return "n/a"
    text = f"{_time(row['time_s'])} · {row['ratio_native']:.2f} · {row['ratio_floor']:.2f}"
    if str(row.get("check", "")).startswith("MISMATCH"):
        text += " ⚠ " + row["check"]
    return text


def _memory_cell(row: dict[str, Any] | None) -> str:
    if row is None or "skipped" in row or row.get("peak_bytes") is None:
        return ""
    needed = row["output_bytes"] + row.get("z_bytes", 0)
    text = f"{row['peak_bytes'] / MB:.3g} MB · {row['peak_bytes'] / needed:.2f}"
    native = row.get("native_peak_bytes")
    if native is not None:
        text += f" · {native / needed:.2f}"
    return text


def _header(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    load_before = results.get("load_average_before")
    load_after = results.get("load_average_after")

    def load(value: Any) -> str:
        return "n/a" if not value else ", ".join(f"{x:.2f}" for x in value)

    memory = machine.get("memory_bytes")
    lines = [
        f"Run {results['created']}: `{results['command']}`"
        + (" (smoke: timings not meaningful)" if results.get("smoke") else ""),
        "",
        f"- machine: {machine['cpu']}, {machine['cpus']} CPUs"
        + (f", {memory / 2**30:.0f} GiB" if memory else "")
        + (f", GPUs: {', '.join(machine['gpus'])}" if machine.get("gpus") else ", no GPU"),
        f"- load average (1, 5, 15 min) before: {load(load_before)}; after: {load(load_after)}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in machine['versions'].items())}",
        f"- dtype {results['dtype']}; threads: {results.get('threads')};"
        f" wall time {results['duration_s']:.0f} s",
    ]
    for name, reason in results.get("skipped_backends", {}).items():
        lines.append(f"- {name}: skipped ({reason})")
    return lines


def results_markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    lines = ["# structcov benchmark results", "", *_header(results), ""]
    lines += [
        "Each cell: structcov's median time per call · ratio to the hand-written native "
        "version · ratio to the floor, all measured in this run (interleaved rounds). "
        "`n/a`: not timed (see the baselines section). `sample`/`factor_matmul` draw/take "
        "B = 64 samples, fewer where B K > 1.6e7 normals or B P > 6.4e7 outputs (P = 1e6: "
        "16 for the diagonal, 15 for low rank plus diagonal; P = 1e7: 1); `matmul` "
        "multiplies 8 vectors.",
        "",
    ]
    structures = {structure_id(s): s for s in default_structures()}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        lines += [f"## {backend}", ""]
        for sid in dict.fromkeys(r["structure"] for r in rows if r["backend"] == backend):
            mine = [r for r in rows if r["backend"] == backend and r["structure"] == sid]
            sizes = sorted({r["P"] for r in mine})
            label = structures[sid].label if sid in structures else sid
            lines += [f"### {label}", ""]
            index = {(r["op"], r["P"]): r for r in mine}
            ops = [op for op in OPERATIONS if any(r["op"] == op for r in mine)]
            body = [[f"`{op}`"] + [_cell(index.get((op, p))) for p in sizes] for op in ops]
            lines += _table(["operation"] + [f"P = {_p(p)}" for p in sizes], body)
            lines.append("")
        lines += [
            f"### Peak memory of `sample` ({backend})",
            "",
            f"Method: {results['memory_methods'].get(rows_backend_name(rows, backend), '?')}. "
            "Each cell: structcov's peak · peak / (output + z) · the native version's "
            "peak / (output + z); z are the B x K standard normals drawn.",
            "",
        ]
        mine = [r for r in rows if r["backend"] == backend and r["op"] == "sample"]
        sizes = sorted({r["P"] for r in mine})
        index = {(r["structure"], r["P"]): r for r in mine}
        sids = list(dict.fromkeys(r["structure"] for r in mine))
        body = [[sid] + [_memory_cell(index.get((sid, p))) for p in sizes] for sid in sids]
        lines += _table(["structure"] + [f"P = {_p(p)}" for p in sizes], body)
        lines.append("")
    mismatches = [r for r in rows if str(r.get("check", "")).startswith("MISMATCH")]
    if mismatches:
        lines += ["## Mismatches (structcov vs native)", ""]
        lines += [
            f"- {r['backend']} {r['structure']} P={r['P']} `{r['op']}`: {r['check']}"
            for r in mismatches
        ]
        lines.append("")
    return "\n".join(lines)


def rows_backend_name(rows: list[dict[str, Any]], backend: str) -> str:
    for row in rows:
        if row["backend"] == backend:
            return str(row["backend_name"])
    return backend


def baselines_markdown() -> str:
    """What the native and floor variants compute, per structure and operation."""
    lines = []
    for structure in default_structures():
        sid = structure_id(structure)
        lines += [f"**{structure.label}** (`{sid}`, up to P = {_p(structure.max_params)})", ""]
        body = []
        for op in OPERATIONS:
            if op in structure.skips:
                body.append([f"`{op}`", "not timed: " + structure.skips[op], ""])
            else:
                body.append([f"`{op}`", structure.natives[op], structure.floors[op]])
        lines += _table(["operation", "native", "floor"], body)
        lines.append("")
    return "\n".join(lines)


def targets_markdown(results: dict[str, Any]) -> str:
    lines = ["# structcov benchmark targets", "", *_header(results), ""]
    body = []
    for t in results["targets"]:
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        met = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        body.append(
            [t["id"], t["backend"], t["target"], measured, f"<= {t['threshold']:.2f}", met,
             t["detail"]]
        )  # fmt: skip
    lines += _table(["id", "backend", "target", "measured", "threshold", "result", "detail"], body)
    missed = [t for t in results["targets"] if t["met"] is False]
    lines += ["", f"{len(missed)} of {len(results['targets'])} target rows missed."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- plot
def plot(results: dict[str, Any], path: Path) -> bool:
    """time vs P, one panel per structure and operation, one colour per backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results["rows"] if "time_s" in r]
    sids = list(dict.fromkeys(r["structure"] for r in results["rows"]))
    backends = list(dict.fromkeys(r["backend"] for r in results["rows"]))
    colours = dict(zip(backends, ["C0", "C1", "C2", "C3", "C4", "C5"], strict=False))
    fig, axes = plt.subplots(
        len(sids), len(OPERATIONS), figsize=(2.3 * len(OPERATIONS), 1.9 * len(sids) + 0.8),
        squeeze=False, sharex=True,
    )  # fmt: skip
    for i, sid in enumerate(sids):
        for j, op in enumerate(OPERATIONS):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.minorticks_off()
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(op, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{sid}\nseconds", fontsize=7)
            if i == len(sids) - 1:
                ax.set_xlabel("P", fontsize=7)
            drawn = False
            for backend in backends:
                key = (backend, sid, op)
                mine = sorted(
                    (r for r in rows if (r["backend"], r["structure"], r["op"]) == key),
                    key=lambda r: r["P"],
                )
                if not mine:
                    continue
                drawn = True
                ps = [r["P"] for r in mine]
                colour = colours[backend]
                ax.plot(ps, [r["time_s"] for r in mine], "o-", color=colour, ms=2.5, lw=1.2)
                ax.plot(ps, [r["native_s"] for r in mine], "--", color=colour, lw=0.8)
                ax.plot(ps, [r["floor_s"] for r in mine], ":", color=colour, lw=0.8)
            if not drawn:
                ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center", fontsize=8)
    handles = [
        plt.Line2D([], [], color=colours[b], marker="o", ms=3, label=f"{b} structcov")
        for b in backends
    ]
    handles += [
        plt.Line2D([], [], color="k", ls="--", lw=0.8, label="native"),
        plt.Line2D([], [], color="k", ls=":", lw=0.8, label="floor"),
    ]
    machine = results["machine"]
    fig.suptitle(
        f"structcov median time per call vs P (float32) — {machine['cpu']}, "
        f"{machine['cpus']} CPUs" + (" — SMOKE" if results.get("smoke") else ""),
        fontsize=9,
    )
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=len(handles))
    # Fixed margins: tight_layout over dozens of log axes takes seconds.
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.05, top=0.93, wspace=0.35, hspace=0.3)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# -------------------------------------------------------------------- files
def write_outputs(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    written.append(path)
    path = out / "results.md"
    path.write_text(results_markdown(results) + "\n## Baselines\n\n" + baselines_markdown() + "\n")
    written.append(path)
    path = out / "targets.md"
    path.write_text(targets_markdown(results))
    written.append(path)
    path = out / "time_vs_P.png"
    if plot(results, path):
        written.append(path)
    return written


def _replace_between(text: str, name: str, content: str) -> str:
    start, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if start not in text or end not in text:
        raise ValueError(f"docs/performance.md lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{content.strip()}\n{end}{tail}"


def _demote(markdown: str) -> str:
    """Drop the top-level title and move every heading one level down (for the docs page)."""
    lines = markdown.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join("#" + line if line.startswith("#") else line for line in lines)


def update_docs(results: dict[str, Any], out: Path, docs: Path) -> list[Path]:
    page = docs / "performance.md"
    text = page.read_text()
    text = _replace_between(text, "targets", _demote(targets_markdown(results)))
    text = _replace_between(text, "results", _demote(results_markdown(results)))
    text = _replace_between(text, "baselines", baselines_markdown())
    page.write_text(text)
    updated = [page]
    figure = out / "time_vs_P.png"
    if figure.exists():
        (docs / "img").mkdir(exist_ok=True)
        shutil.copyfile(figure, docs / "img" / "time_vs_P.png")
        updated.append(docs / "img" / "time_vs_P.png")
    return updated
