"""The consolidated report of a study: ``build_report(study_dir)`` renders ``report.html`` (Jinja2 templates,
images as files next to it), ``results.csv`` and ``results.md`` from the cells' result records.

This layer reads records and image files only; it never loads a model.
"""

from xailab.report.build import build_report, read_records, results_rows, top_confusions

__all__ = ["build_report", "read_records", "results_rows", "top_confusions"]
