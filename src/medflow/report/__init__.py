"""The self-contained HTML report (``reports/index.html``)."""

from medflow.report.build import build_report

__all__ = ["build_report"]
