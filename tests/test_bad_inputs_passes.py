"""Bad inputs to the rewrite, the backend and the HF integration: each a clear error (issue #13).

Every case here once gave an error that did not name the value or the fix (an Inductor
"missing config key" for a misspelt DGA option, AttributeError for a wrong config type).
"""

import pytest
import torch
import torch.nn.functional as F

import dga_compile
from dga_compile import DGAConfig, rewrite
from dga_compile.backend import _split_options, dga_backend


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class _Sdpa(torch.nn.Module):
    def forward(self, q, k, v):
        return _sdpa(q, k, v)


@pytest.fixture(scope="module")
def program():
    q = torch.randn(1, 2, 8, 4)
    return torch.export.export(_Sdpa(), (q, q, q))


@pytest.mark.parametrize("key, field", [("focus_ration", "focus_ratio"), ("group_sise", "group_size"),
                                        ("dense_layer", "dense_layers")], ids=["focus_ration", "group_sise",
                                                                               "dense_layer"])
def test_backend_option_near_miss_names_the_field(key, field):
    """A near miss of a DGAConfig field raised "missing Inductor config key" at the first call."""
    gm = torch.fx.symbolic_trace(_Sdpa())
    with pytest.raises(ValueError, match=f"unknown option '{key}' for backend='dga': did you mean '{field}'"):
        dga_backend(gm, [], options={key: 0.2})


def test_backend_option_near_miss_raises_at_first_call():
    """Through torch.compile the same message reaches the user at the first call."""
    torch._dynamo.reset()
    fn = torch.compile(_sdpa, backend="dga", options={"focus_ration": 0.2})
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(Exception, match="did you mean 'focus_ratio'"):
        fn(q, q, q)


def test_backend_unknown_option_says_what_it_is_not():
    gm = torch.fx.symbolic_trace(_Sdpa())
    with pytest.raises(ValueError, match="'zzz_option'.*neither a DGAConfig field .* nor an Inductor config key"):
        dga_backend(gm, [], options={"zzz_option": 1})


def test_backend_options_split_between_dga_and_inductor():
    """DGAConfig fields configure DGA, Inductor config keys stay Inductor patches."""
    assert _split_options({"focus_ratio": 0.2, "epilogue_fusion": False, "triton.cudagraphs": False}) == (
        {"focus_ratio": 0.2}, {"epilogue_fusion": False, "triton.cudagraphs": False})


def test_backend_options_not_a_dict():
    with pytest.raises(TypeError, match="options must be a dict, got list"):
        _split_options([("focus_ratio", 0.2)])


def test_backend_option_value_is_validated():
    gm = torch.fx.symbolic_trace(_Sdpa())
    with pytest.raises(ValueError, match=r"DGAConfig.focus_ratio must be a number in \[0.0, 1.0\], got 2.0"):
        dga_backend(gm, [], options={"focus_ratio": 2.0})


@pytest.mark.parametrize("bad", [{}, "x", 0.1], ids=["dict", "str", "float"])
def test_config_not_a_dgaconfig_is_a_type_error(bad, program):
    """config={} gave AttributeError deep inside; every entry point now names the type and the fix."""
    with pytest.raises(TypeError, match="config must be a DGAConfig or None"):
        dga_compile.backend(bad)
    with pytest.raises(TypeError, match="config must be a DGAConfig or None"):
        dga_compile.compile(torch.nn.Identity(), bad)
    with pytest.raises(TypeError, match="config must be a DGAConfig or None"):
        rewrite(program, bad)


def test_register_config_not_a_dgaconfig():
    pytest.importorskip("transformers")
    from dga_compile.integrations.transformers import register

    with pytest.raises(TypeError, match="config must be a DGAConfig or None, got dict"):
        register({})


@pytest.mark.parametrize("bad", [torch.nn.Linear(2, 2), "model.pt2", None], ids=["module", "str", "none"])
def test_rewrite_takes_only_traced_programs(bad):
    with pytest.raises(TypeError, match="rewrite\\(\\) takes a torch.fx.GraphModule or a torch.export.ExportedProgram"):
        rewrite(bad, DGAConfig())
