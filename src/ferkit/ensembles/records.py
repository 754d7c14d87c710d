"""results/ensembles.csv: one row per (recorded ensemble, method), with the best member beside it.

`ferkit ensemble ... --record NAME` calls `record_report`; rows are keyed by `NAME/method`, so re-running
a command replaces its rows and other ensembles' rows are kept. `render_table` turns the file into the
Markdown table of docs/results.md.
"""

from __future__ import annotations

import os

from ferkit.ensembles.predictions import EnsembleReport
from ferkit.shared_files import locked, read_rows, write_rows

ENSEMBLES_COLUMNS = ("name", "method", "members", "public_test", "private_test", "best_member",
                     "best_member_public_test", "best_member_private_test", "gain_points", "command")


def report_rows(report: EnsembleReport, name: str, command: str) -> list[dict[str, str]]:
    """The report's ensembles as results rows (accuracies as fractions, the gain in PrivateTest points)."""
    best = report.best_member
    rows = []
    for e in report.ensembles:
        used = e.get("selected") or [n for n, w in e["member_weights"].items() if w > 0]
        rows.append({"name": f"{name}/{e['name']}", "method": e["method"],
                     "members": ";".join(dict.fromkeys(used)),
                     "public_test": f"{e['public_accuracy']:.4f}", "private_test": f"{e['private_accuracy']:.4f}",
                     "best_member": best["name"], "best_member_public_test": f"{best['public_accuracy']:.4f}",
                     "best_member_private_test": f"{best['private_accuracy']:.4f}",
                     "gain_points": f"{e['private_gain_vs_best_member'] * 100:+.2f}", "command": command})
    return rows


def read_records(path: str | os.PathLike) -> list[dict[str, str]]:
    return read_rows(path)


def record_report(report: EnsembleReport, name: str, command: str,
                  path: str | os.PathLike = "results/ensembles.csv") -> list[dict[str, str]]:
    """Upsert the report's rows into `path` (atomically, under a lock); rows of other ensembles keep their place."""
    if not name or "/" in name or "," in name:
        raise ValueError(f"ensemble record name {name!r} must be non-empty, without '/' or ','")
    new = report_rows(report, name, command)
    with locked(path):
        rows = {r["name"]: r for r in read_rows(path) if not r["name"].startswith(f"{name}/")}
        rows.update({r["name"]: r for r in new})
        write_rows(path, ENSEMBLES_COLUMNS, rows.values())
    return new


def render_table(rows: list[dict[str, str]]) -> str:
    """Markdown table: each ensemble beside its best member (chosen on PublicTest), PrivateTest the headline."""
    lines = ["| ensemble | method | members | PublicTest | PrivateTest | best member (PrivateTest) | gain (points) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        members = r["members"].split(";")
        shown = ", ".join(members) if len(members) <= 4 else f"{len(members)} members"
        lines.append(f"| {r['name'].split('/')[0]} | {r['name'].split('/', 1)[1]} | {shown} | "
                     f"{float(r['public_test']):.2%} | **{float(r['private_test']):.2%}** | "
                     f"{r['best_member']} ({float(r['best_member_private_test']):.2%}) | {r['gain_points']} |")
    return "\n".join(lines)
