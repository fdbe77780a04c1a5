"""Publishing tasks: the run's markdown artifact in Prefect."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact


@task(name="publish-report", retries=2, retry_delay_seconds=2)
def publish_report(markdown: str, key: str, description: str) -> str:
    """A Prefect markdown artifact (sweep table, chosen δ, gate decision); returns its id."""
    return str(create_markdown_artifact(markdown=markdown, key=key, description=description))
