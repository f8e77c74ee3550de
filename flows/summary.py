"""The outcome of a batch: counts and, for each failed run, what to look at.

The same model is the flow's result, the JSON artifact the shim reads back, and the
source of the markdown artifact a person reads in the Prefect UI.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

# Keys of the artifacts the flow publishes: markdown for people, JSON for the shim.
SUMMARY_KEY = "sierra-summary"
SUMMARY_JSON_KEY = "sierra-summary-json"


class FailedRun(BaseModel):
    name: str
    run_id: str
    command: str
    exit_code: int | None = Field(description="None when the run was killed on timeout")
    timed_out: bool = False
    stdout: str
    stderr: str


class BatchSummary(BaseModel):
    input_root: str
    scratch_root: str
    total: int
    succeeded: int
    failed: int
    skipped: int
    max_parallel: int
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

    def to_markdown(self) -> str:
        lines = [
            "# SIERRA batch summary",
            "",
            f"- input root: `{self.input_root}`",
            f"- scratch root: `{self.scratch_root}`",
            f"- cap: {self.max_parallel} runs at once",
            "",
            "| total | succeeded | failed | skipped |",
            "|---|---|---|---|",
            f"| {self.total} | {self.succeeded} | {self.failed} | {self.skipped} |",
        ]
        if self.failed_runs:
            lines += ["", "## Failed runs", "", "| run | exit code | command | stdout | stderr |"]
            lines.append("|---|---|---|---|---|")
            for run in self.failed_runs:
                code = "timeout" if run.timed_out else str(run.exit_code)
                command = run.command.replace("|", "\\|")
                lines.append(
                    f"| {run.name} | {code} | `{command}` | `{run.stdout}` | `{run.stderr}` |"
                )
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
