"""Reviewing an output directory: statistics and summaries, the HTML report, curation exports."""
