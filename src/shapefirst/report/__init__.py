"""`shapefirst report`: the page's logic lives in report/page.py, beside its template (report/template.html)."""
from .page import BUDGETS, CALL_KEYS, build_page, check_call, keep_peers, run_report, with_call_defaults

__all__ = ["BUDGETS", "CALL_KEYS", "build_page", "check_call", "keep_peers", "run_report", "with_call_defaults"]
