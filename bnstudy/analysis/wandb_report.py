"""The report as one W&B run (job type report) in the runs' project: every figure, the runs table
and the claims table."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from bnstudy.analysis.html import format_cell

if TYPE_CHECKING:
    from bnstudy.analysis.report import Report
    from bnstudy.analysis.runs import Run


def wandb_active() -> bool:
    """A W&B mode is active: WANDB_MODE online/offline, or (no WANDB_MODE) an API key."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode:
        return mode not in ("disabled", "false")
    return has_wandb_key()


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def log_to_wandb(report: Report, runs: list[Run]) -> Path:
    """One W&B run, job type report, in the runs' project: every figure and both tables."""
    import wandb

    projects = [r.wandb_project for r in runs]
    entity, project = max(set(projects), key=projects.count) if projects else (None, None)
    report.out.mkdir(parents=True, exist_ok=True)
    # the mode is read now: wandb keeps the settings of the first run of a process, which may
    # have been a fit with W&B disabled
    mode = os.environ.get("WANDB_MODE", "").lower()
    run = wandb.init(project=project or "bnstudy", entity=entity, job_type="report",
                     dir=str(report.out.resolve()), name=f"report-{report.out.name}",
                     mode=mode if mode in ("online", "offline") else None,
                     config={"runs": [r.id for r in runs], "figures": list(report.figures),
                             "skipped": list(report.skipped)}, reinit="create_new")
    try:
        columns, rows = report.table
        run.log({**{f"figures/{name}": wandb.Image(str(path))
                    for name, path in report.figures.items()},
                 "runs": wandb.Table(columns=columns, data=[[format_cell(v) for v in row]
                                                            for row in rows]),
                 "claims": wandb.Table(columns=["claim", "statement", "rule", "numbers",
                                                "verdict", "note"],
                                       data=[[c.number, c.statement, c.rule, "\n".join(c.numbers),
                                              c.verdict, c.note] for c in report.claims])})
        for c in report.claims:
            run.summary[f"claim{c.number}"] = c.verdict
        return Path(run.dir).parent
    finally:
        run.finish()
