"""`shapefirst report`: the page's logic lives in report/page.py, beside its template (report/template.html)."""
from .page import BUDGETS, build_page, keep_peers, run_report

__all__ = ["BUDGETS", "build_page", "keep_peers", "run_report"]
