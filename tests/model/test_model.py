"""The P6 transformer: size of the original, shapes, unit predictions, use of every context slot."""

import pytest
import torch

from lvm.model.transformer import (
    P6Transformer,
    ShortAttention,
    short_attention,
    sinusoidal_positions,
)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def p6(dim=768, block="decoder", **kw):
    return P6Transformer(dim=dim, d_model=512, layers=4, heads=8, ffn=2048, dropout=0.1, max_context=5, block=block, **kw)


def test_original_size_at_768():
    # Reference: about 17.9 M parameters at D = 768.
    assert count_parameters(p6()) == pytest.approx(17.9e6, rel=0.01)
    assert count_parameters(p6(block="encoder")) < 14e6


def test_dim_is_read_not_hardcoded():
    small = P6Transformer(dim=384, d_model=32, layers=1, heads=4, ffn=64, dropout=0.0, max_context=5, block="decoder")
    raw, pred = small(torch.randn(7, 5, 384))
    assert raw.shape == pred.shape == (7, 384)
    assert torch.allclose(pred.norm(dim=-1), torch.ones(7), atol=1e-5)
    assert torch.allclose(pred, torch.nn.functional.normalize(raw, dim=-1))


def test_every_context_slot_matters_and_eval_is_deterministic():
    torch.manual_seed(0)
    m = P6Transformer(dim=16, d_model=32, layers=2, heads=4, ffn=64, dropout=0.1, max_context=5, block="decoder").eval()
    ctx = torch.randn(3, 5, 16)
    base = m(ctx)[0]
    assert torch.equal(base, m(ctx)[0])
    for slot in range(5):
        changed = ctx.clone()
        changed[:, slot] += 1.0
        assert not torch.allclose(m(changed)[0], base, atol=1e-5), slot


def test_out_init_scale_shrinks_initial_output():
    torch.manual_seed(0)
    ctx = torch.nn.functional.normalize(torch.randn(64, 5, 32), dim=-1)
    big = P6Transformer(32, 64, 1, 4, 128, 0.0, 5, "decoder")
    torch.manual_seed(0)
    small = P6Transformer(32, 64, 1, 4, 128, 0.0, 5, "decoder", out_init_scale=0.1)
    ratio = small(ctx)[0].norm(dim=-1).mean() / big(ctx)[0].norm(dim=-1).mean()
    assert 0.05 < ratio < 0.2


def test_sinusoidal_positions():
    pe = sinusoidal_positions(5, 8)
    assert torch.allclose(pe[0, 0::2], torch.zeros(4)) and torch.allclose(pe[0, 1::2], torch.ones(4))
    assert pe[3, 0].item() == pytest.approx(torch.sin(torch.tensor(3.0)).item())


def test_context_skip_starts_at_the_mean_of_context_and_learns_slot_weights():
    torch.manual_seed(0)
    m = P6Transformer(16, 32, 1, 4, 64, 0.0, 5, "decoder", context_skip=True).eval()
    assert count_parameters(m) == count_parameters(P6Transformer(16, 32, 1, 4, 64, 0.0, 5, "decoder")) + 5
    with torch.no_grad():
        m.head[-1].weight.zero_()
        m.head[-1].bias.zero_()
    ctx = torch.nn.functional.normalize(torch.randn(3, 5, 16), dim=-1)
    raw, pred = m(ctx)
    torch.testing.assert_close(raw, ctx.mean(1))  # head silent: exactly the mean-of-context baseline
    raw.sum().backward()
    torch.testing.assert_close(m.skip_weights.grad, ctx.sum(dim=(0, 2)))  # d sum(raw) / d w_k = sum of slot k
    with torch.no_grad():
        m.skip_weights.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(m(ctx)[0], ctx[:, -1])  # all weight on the last slot: copy-last


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("bool_mask", [False, True])
def test_short_attention_is_pytorchs_multihead_attention(cross, bool_mask):
    # The oracle: nn.MultiheadAttention itself (fused kernel) with the same parameters, outputs and
    # gradients, under the causal mask the P6 layers pass and with none.
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(32, 4, dropout=0.0, batch_first=True)
    short = short_attention(ref)
    x = torch.randn(6, 5, 32, requires_grad=True)
    mem = torch.randn(6, 5, 32) if cross else x
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    mask = causal if bool_mask else torch.zeros(5, 5).masked_fill(causal, float("-inf"))
    for kw in ({"attn_mask": mask, "is_causal": True}, {"attn_mask": mask}, {}):
        a = ref(x, mem, mem, need_weights=False, **kw)[0]
        b = short(x, mem, mem, need_weights=False, **kw)[0]
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
        ga = torch.autograd.grad(a.pow(2).sum(), [x, ref.in_proj_weight, ref.out_proj.weight])
        gb = torch.autograd.grad(b.pow(2).sum(), [x, short.in_proj_weight, short.out_proj.weight])
        for u, v in zip(ga, gb):
            torch.testing.assert_close(v, u, atol=1e-5, rtol=1e-4)


def test_short_attention_keeps_parameters_and_the_seeded_stream():
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(32, 4, dropout=0.1, batch_first=True)
    after = torch.get_rng_state()
    short = short_attention(ref)
    assert torch.equal(torch.get_rng_state(), after)  # no init drawn: seeded models are nn.MultiheadAttention's
    assert short.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(short.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert short.dropout == 0.1 and short.num_heads == 4
    assert all(
        isinstance(layer.self_attn, ShortAttention) and isinstance(layer.multihead_attn, ShortAttention)
        for layer in p6(dim=16).blocks.layers
    )
    with torch.device("meta"):  # config validation builds the model on the meta device
        assert p6(dim=2).blocks.layers[0].self_attn.in_proj_weight.is_meta


def test_short_attention_refuses_what_it_does_not_compute():
    short = short_attention(torch.nn.MultiheadAttention(8, 2, batch_first=True))
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="key padding"):
        short(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key padding"):
        short(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="is_causal"):
        short(x, x, x, is_causal=True)
