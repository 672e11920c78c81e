"""FX passes that find attention sites and rewrite them into DGA (installed as ``dga_compile.passes``).

``rewrite(program, config) -> (program, report)`` is the entry point. Modules, in the order a
site goes through them: `_rules` (one rule per spelling family: pattern / check / rewrite),
reading the graph through `_walk` (the one walker), `_layout` (dims through views, products as
einsums), `_masks` (what a mask proves) and `_provenance` (self- or cross-attention); then
`_checks` (what the op can compute), `dga_compile.policy` (what is worth rewriting: the one site
policy of every entry point, and the report), `_insert` and `_dce` (the rewrite); `_driver` runs them.
"""

from .. import policy
from ..errors import RewriteError
from ..policy import RewriteReport, Site
from ._driver import rewrite, rewrite_graph_module

__all__ = ["RewriteError", "RewriteReport", "Site", "policy", "rewrite", "rewrite_graph_module"]
