"""Hugging Face transformers models built from configs (no download): GPT-2's Conv1D becomes Bayesian."""

import pytest
import torch

import vinn

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # importing transformers takes seconds


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_layers_become_bayesian_and_keep_their_layout():
    from vinn.huggingface import Conv1D

    model = _gpt2()
    with pytest.warns(UserWarning, match="could not trace"):
        bnn = vinn.bayesify(model)
    report = bnn.conversion_report
    kinds = {layer.kind for layer in report.converted}
    assert kinds == {"Conv1D", "Embedding", "Linear"}  # the language-model head shares the embedding's posterior
    assert {layer.kind for layer in report.kept} == {"LayerNorm"}
    # why torch.fx failed, in one line of the report
    assert not report.traced and "\n" not in report.trace_error and ": " in report.trace_error
    assert f"torch.fx could not trace the model: {report.trace_error}" in str(report).splitlines()
    attention = bnn.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(attention, Conv1D) and isinstance(attention, transformers.pytorch_utils.Conv1D)
    assert attention.weight.shape == (32, 96)  # (nx, nf), as transformers stores it
    assert attention.weight_prior_scale.dim() == 0
    # a transformers checkpoint loads into the converted model, every key where it was
    missing, unexpected = bnn.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(key.endswith(("_log_sigma2", "_prior_loc", "_prior_scale")) for key in missing)

    tokens = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = model(tokens).logits
        with vinn.deterministic():
            torch.testing.assert_close(bnn(tokens).logits, expected)
        assert not torch.allclose(bnn(tokens).logits, bnn(tokens).logits)
    loss = vinn.ELBO(bnn, torch.nn.CrossEntropyLoss(), dataset_size=100)(bnn(tokens).logits.flatten(0, 1), tokens.flatten())
    loss.backward()
    assert attention.weight_log_sigma2.grad is not None

    back = vinn.to_deterministic(bnn)
    assert type(back.get_submodule("transformer.h.0.attn.c_attn")) is transformers.pytorch_utils.Conv1D
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, expected)


def test_conv1d_lrt_moments():
    from vinn.huggingface import Conv1D

    torch.manual_seed(0)
    layer = Conv1D.from_torch(transformers.pytorch_utils.Conv1D(3, 4), init_scale=0.2)
    x = torch.randn(1, 4).expand(20_000, 4)
    with torch.no_grad():
        out = layer(x)
    mean = x[0] @ layer.weight.detach() + layer.bias.detach()
    var = x[0].square() @ layer.weight_scale.detach().square() + layer.bias_scale.detach().square()
    n = out.shape[0]
    assert ((out.mean(0) - mean).abs() < 4.5 * (var / n).sqrt()).all()
    assert ((out.var(0) - var).abs() < 4.5 * var * (2 / n) ** 0.5).all()
