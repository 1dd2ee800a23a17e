"""What a run shows: the summary, JUnit, report.html, the live status."""
