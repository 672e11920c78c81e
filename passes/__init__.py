"""FX passes that find attention sites and rewrite them into DGA (installed as ``dga_compile.passes``).

``rewrite(program, config) -> (program, report)`` is the entry point; the rules live in
`_rules.py`, the shared checks and the rewrite in `_rewrite.py`, the report in `_report.py`.
"""

from ..errors import RewriteError
from ._report import RewriteReport, Site
from ._rewrite import rewrite, rewrite_graph_module

__all__ = ["RewriteError", "RewriteReport", "Site", "rewrite", "rewrite_graph_module"]
