"""The outcome of a batch: counts and, for each failed run, what to look at.

The same model is the flow's result, the JSON artifact the shim reads back, and the
source of the markdown artifact a person reads in the Prefect UI.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

from flows.resources import format_size

# Keys of the artifacts the flow publishes: markdown for people, JSON for the shim.
SUMMARY_KEY = "sierra-summary"
SUMMARY_JSON_KEY = "sierra-summary-json"
# The progress artifact's description: what the UI shows and what the shim reads back.
_PROGRESS = re.compile(
    r"^(\d+) of (\d+) runs done: (\d+) succeeded, (\d+) failed, (\d+) skipped"
)
FENCE = "`" * 3


def progress_text(total: int, succeeded: int, failed: int, skipped: int) -> str:
    done = succeeded + failed + skipped
    return (f"{done} of {total} runs done: {succeeded} succeeded, {failed} failed, "
            f"{skipped} skipped")


def parse_progress(text: str | None) -> tuple[int, int, int, int] | None:
    """(total, succeeded, failed, skipped) from ``progress_text``'s line, else None."""
    found = _PROGRESS.match(text or "")
    if not found:
        return None
    _, total, succeeded, failed, skipped = map(int, found.groups())
    return total, succeeded, failed, skipped


class FailedRun(BaseModel):
    name: str
    run_id: str
    command: str
    exit_code: int | None = Field(description="None when the run was killed on timeout")
    timed_out: bool = False
    stdout: str
    stderr: str
    attempt: int | None = None  # the number of its last attempt's logs (attempt-00k)
    attempts: int = 1  # made by this flow run, retries included
    reason: str | None = None  # e.g. "memory limit 2.0G exceeded", "timed out"
    peak_memory: int | None = None  # bytes
    # The last lines of the attempt's stderr, so the reason shows without opening a file.
    stderr_tail: str = ""


class BatchSummary(BaseModel):
    input_root: str
    scratch_root: str
    total: int
    succeeded: int
    failed: int
    skipped: int
    max_parallel: int  # runs at once, after cores per run
    cores_per_run: int = 1
    pinned: bool = True  # each run on CPUs of its own (False: no taskset on the worker)
    memory_per_run: int | None = None  # bytes
    retries: int = 0
    # Runs that succeeded only after a retry, with the attempts each took.
    retried: dict[str, int] = {}
    failed_runs: list[FailedRun] = []
    # Runs executed per worker (several with spread), and whether a spread child declined.
    workers: dict[str, int] = {}
    declined: bool = False

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def headline(self) -> str:
        return (
            f"{self.total} runs: {self.succeeded} succeeded, {self.failed} failed, "
            f"{self.skipped} skipped (already done)"
        )

    def _resources(self) -> str:
        pinning = "pinned" if self.pinned else "not pinned: no taskset"
        memory = f", {format_size(self.memory_per_run)} memory each" if self.memory_per_run else ""
        return f"{self.cores_per_run} CPU(s) each ({pinning}){memory}, up to {self.retries} retries"

    def to_markdown(self) -> str:
        lines = [
            "# SIERRA batch summary",
            "",
            f"- input root: `{self.input_root}`",
            f"- scratch root: `{self.scratch_root}`",
            f"- cap: {self.max_parallel} runs at once, {self._resources()}",
            "",
            "| total | succeeded | failed | skipped |",
            "|---|---|---|---|",
            f"| {self.total} | {self.succeeded} | {self.failed} | {self.skipped} |",
        ]
        if self.retried:
            lines += ["", "## Succeeded after a retry", "", "| run | attempts |", "|---|---|"]
            lines += [f"| {name} | {attempts} |" for name, attempts in self.retried.items()]
        if self.failed_runs:
            lines += ["", "## Failed runs", "",
                      "| run | exit code | reason | attempts | command | stdout | stderr |",
                      "|---|---|---|---|---|---|---|"]
            for run in self.failed_runs:
                code = "timeout" if run.timed_out else str(run.exit_code)
                command = run.command.replace("|", "\\|")
                lines.append(
                    f"| {run.name} | {code} | {run.reason or ''} | {run.attempts} | `{command}` "
                    f"| `{run.stdout}` | `{run.stderr}` |"
                )
            for run in self.failed_runs:
                if run.stderr_tail:
                    lines += ["", f"### {run.name}: last lines of stderr", "", FENCE,
                              run.stderr_tail.replace(FENCE, "` ` `"), FENCE]
        return "\n".join(lines) + "\n"


def read_summary(client, flow_run_id) -> BatchSummary | None:
    """The summary a flow run of ``sierra`` published (None if it published none).

    ``client`` is a sync Prefect client; Prefect is imported only here, so the model
    above stays importable without it.
    """
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_JSON_KEY])),
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
    )
    return BatchSummary.model_validate(artifacts[0].data) if artifacts else None
