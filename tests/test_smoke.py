import pytest
import torch
import torch.nn.functional as F

from dga_compile import DGAConfig, dynamic_group_attention, reference_attention


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_blocked_matches_reference_B2_H4_N300_D16(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 16, dtype=torch.float64) for _ in range(3))
    cfg = DGAConfig(min_seq_len=0, group_size=4, window=8, num_probe=8)
    out = dynamic_group_attention(q, k, v, is_causal=causal, config=cfg)
    ref = reference_attention(q, k, v, is_causal=causal, config=cfg)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert (out - F.scaled_dot_product_attention(q, k, v, is_causal=causal)).abs().max() > 1e-3  # really approximate
