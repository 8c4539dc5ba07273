"""The speed levers change the cost, never the maths: the cheap dropout mask and the pipeline's attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attention import padding_mask, pipeline_attention
from pipeline.regularization import FastDropout, active_dropout, fast_dropout, keep_mask, set_dropout
from tests.test_techniques import build, dropout_layers, tiny_batch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_fast_dropout_drops_at_rate_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = fast_dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5 + 1 / 65536
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 0.01


def test_fast_dropout_masks_are_fresh_and_unbiased_across_positions():
    torch.manual_seed(0)
    a, b = keep_mask(torch.Size([64, 33]), 0.5, torch.device("cpu")), keep_mask(torch.Size([64, 33]), 0.5,
                                                                                 torch.device("cpu"))
    assert not torch.equal(a, b)
    rate = torch.stack([keep_mask(torch.Size([7, 5]), 0.3, torch.device("cpu")) for _ in range(4000)]).float()
    assert (rate.mean(0) - 0.7).abs().max() < 0.04  # every position (odd shapes too) keeps ~1 - p


def test_fast_dropout_gradient_is_zero_on_dropped_and_scaled_on_kept():
    torch.manual_seed(0)
    x = torch.randn(50, 40, requires_grad=True)
    y = fast_dropout(x, 0.25)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.all(x.grad[~kept] == 0)
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.75))


def test_fast_dropout_is_identity_in_eval_and_at_p0_and_rejects_p1():
    x = torch.randn(8, 8)
    layer = FastDropout(0.4).eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(fast_dropout(x, 0.0), x)
    with pytest.raises(ValueError, match="dropout probability"):
        fast_dropout(x, 1.0)


def test_fast_dropout_keeps_the_dtype_under_bf16():
    x = torch.randn(16, 16, dtype=torch.bfloat16)
    assert fast_dropout(x, 0.1).dtype == torch.bfloat16


def test_fast_dropout_is_still_dropout_for_the_technique_switches():
    model = nn.Sequential(FastDropout(0.2), nn.Linear(2, 2))
    assert active_dropout(model) == ["0"]
    assert set_dropout(model, 0.0) == 1 and active_dropout(model) == []


def test_build_model_swaps_every_dropout_and_sets_the_attention(tmp_path, tiny_backbone):
    _, model, _ = build(tmp_path, tiny_backbone)
    assert model.backbone.config._attn_implementation == "pipeline"
    assert not [m for m in model.modules() if type(m) is nn.Dropout]
    assert dropout_layers(model)  # the pretrained 0.1 dropout is still there, as FastDropout
    _, stock, _ = build(tmp_path, tiny_backbone, "model.attention=sdpa", "model.fast_dropout=false")
    assert stock.backbone.config._attn_implementation == "sdpa"
    assert not [m for m in stock.modules() if isinstance(m, FastDropout)]


def test_pipeline_attention_equals_sdpa_forward_and_backward(tmp_path, tiny_backbone):
    """Without dropout the pipeline's kernel and transformers' SDPA give the same outputs and gradients."""
    batch = tiny_batch(tiny_backbone)
    assert (batch.inputs["attention_mask"] == 0).any()  # padding is exercised
    results = []
    for attention in ("pipeline", "sdpa"):
        torch.manual_seed(0)
        _, model, _ = build(tmp_path, tiny_backbone, f"model.attention={attention}", "model.dropout=0",
                            "model.head_dropout=0")
        out = model(**batch.inputs)
        out.pow(2).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.backbone.parameters() if p.grad is not None]))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    assert len(grads_a) == len(grads_b) > 10
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_pipeline_attention_dropout_drops_attention_weights():
    """Attention dropout is applied in training (two passes differ) and the rows still average to the input."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    v = torch.ones(2, 2, 5, 4, requires_grad=True)
    module = nn.Module().train()
    a, _ = pipeline_attention(module, q, k, v, None, dropout=0.5)
    b, _ = pipeline_attention(module, q, k, v, None, dropout=0.5)
    assert not torch.equal(a, b)
    none, _ = pipeline_attention(module, q, k, v, None, dropout=0.0)
    torch.testing.assert_close(none, torch.ones_like(none))  # softmax rows sum to 1
    many = torch.stack([pipeline_attention(module, q, k, v, None, dropout=0.5)[0] for _ in range(2000)])
    assert abs(many.mean().item() - 1.0) < 0.02  # inverted dropout keeps the expectation


def test_padding_mask_is_one_row_per_sequence_and_none_without_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    out = padding_mask(batch_size=2, q_length=4, kv_length=4, attention_mask=mask)
    assert out.shape == (2, 1, 1, 4) and out.dtype == torch.bool
    assert torch.equal(out[:, 0, 0], mask.bool())
    assert padding_mask(batch_size=2, q_length=4, kv_length=4, attention_mask=torch.ones(2, 4, dtype=torch.long)) \
        is None
    # transformers 5.0 (Kaggle's image) names the query positions cache_position, not q_length
    old_style = padding_mask(batch_size=2, cache_position=torch.arange(4), kv_length=4, attention_mask=mask)
    assert torch.equal(old_style, out)
    shifted = padding_mask(batch_size=2, q_length=4, kv_length=4, q_offset=2, attention_mask=mask)
    assert shifted.shape == (2, 1, 4, 4)  # an offset is transformers' own mask


def test_pipeline_attention_masks_padded_keys():
    """A padded key gets no weight: changing its value changes nothing."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 4, 8, requires_grad=True), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    mask = padding_mask(batch_size=1, q_length=4, kv_length=4, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    out, _ = pipeline_attention(nn.Module().train(), q, k, v, mask)
    v2 = v.clone()
    v2[..., 3, :] += 100
    out2, _ = pipeline_attention(nn.Module().train(), q, k, v2, mask)
    torch.testing.assert_close(out, out2)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pipeline_attention_on_cuda_is_sdpa_with_the_same_results(tmp_path, tiny_backbone):
    batch = tiny_batch(tiny_backbone).to(torch.device("cuda"))
    outputs = []
    for attention in ("pipeline", "sdpa"):
        torch.manual_seed(0)
        _, model, _ = build(tmp_path, tiny_backbone, f"model.attention={attention}", "model.dropout=0",
                            "model.head_dropout=0")
        model.cuda()
        with torch.autocast("cuda", dtype=torch.float16):
            outputs.append(model(**batch.inputs).float())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-2, atol=1e-3)
    x = torch.ones(1000, device="cuda")
    assert (fast_dropout(x, 0.5) == 0).any()  # F.dropout on CUDA


def test_long_inputs_split_the_batch_with_the_same_results(monkeypatch):
    """Above the scores budget the batch runs in groups of sequences: same outputs and gradients, padding kept."""
    import pipeline.attention as A

    torch.manual_seed(0)
    base = [torch.randn(5, 2, 6, 4) for _ in range(3)]
    mask = padding_mask(batch_size=5, q_length=6, kv_length=6,
                        attention_mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 6, [1] * 3 + [0] * 3, [1] * 6]))
    results = []
    for budget in (A.SCORES_BUDGET, 2 * 6 * 6 * 2):  # one call, then groups of 2 sequences (2, 2, 1)
        monkeypatch.setattr(A, "SCORES_BUDGET", budget)
        q, k, v = [x.clone().requires_grad_() for x in base]
        out, _ = pipeline_attention(nn.Module().train(), q, k, v, mask)
        out.pow(2).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ref = F.scaled_dot_product_attention(*base, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(results[1][0], ref, rtol=1e-5, atol=1e-6)


def test_long_inputs_keep_attention_dropout_and_the_recipe_shape_is_one_call(monkeypatch):
    import pipeline.attention as A

    calls = []
    original = A._attention
    monkeypatch.setattr(A, "_attention", lambda *a: calls.append(a[1].shape[0]) or original(*a))
    q = torch.zeros(16, 12, 256, 32, dtype=torch.bfloat16)
    pipeline_attention(nn.Module().train(), q, q, q, None)
    assert calls == [16]  # batch 16 at 256 tokens (the recipe): the path it always took
    calls.clear()
    q = torch.zeros(16, 12, 512, 32, dtype=torch.bfloat16)
    pipeline_attention(nn.Module().train(), q, q, q, None)
    assert calls == [4] * 4
    monkeypatch.setattr(A, "SCORES_BUDGET", 2 * 5 * 5 * 2)
    torch.manual_seed(0)
    qk, v = torch.randn(6, 2, 5, 4), torch.ones(6, 2, 5, 4)
    a, _ = pipeline_attention(nn.Module().train(), qk, qk, v, None, dropout=0.5)
    b, _ = pipeline_attention(nn.Module().train(), qk, qk, v, None, dropout=0.5)
    assert not torch.equal(a, b)  # dropout still drops, fresh each pass
    many = torch.stack([pipeline_attention(nn.Module().train(), qk, qk, v, None, dropout=0.5)[0] for _ in range(1000)])
    assert abs(many.mean().item() - 1.0) < 0.03
