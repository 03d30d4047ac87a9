"""Inputs that once gave wrong results or crashes (found by trying to break the library)."""

import pytest
import torch
from torch import nn

from lora_fast import (
    LinearWithLoRA,
    LoRALayer,
    load_lora,
    lora_linear,
    merge_lora,
    reference,
    replace_linear_with_lora,
    save_lora,
)
from tests.utils import check_op, make_inputs


def test_strided_and_expanded_bias(device):
    x, w, _, A, B = make_inputs((9,), 40, 36, 4, torch.float32, device)
    for bias in (torch.randn(72, device=device)[::2], torch.randn(1, device=device).expand(36)):
        check_op(lora_linear, x, w, bias, A, B, scale=0.5)


def test_double_backward_is_the_references(device):
    """.backward() through a gradient taken with create_graph=True: the reference's second derivatives (it used
    to raise; tests/test_second_order.py checks hvp and hessian against float64)."""
    x, w, b, A, B = make_inputs((5,), 40, 36, 4, torch.float32, device)
    grads = []
    for op in (lora_linear, reference.lora_linear):
        xs, As = x.detach().clone().requires_grad_(), A.detach().clone().requires_grad_()
        (gx,) = torch.autograd.grad(op(xs, w, b, As, B, 0.5).square().sum(), xs, create_graph=True)
        gx.square().sum().backward()
        grads.append((xs.grad, As.grad))
    for got, want in zip(*grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_zero_out_features(device):
    x, w, b, A, B = make_inputs((5,), 40, 36, 4, torch.float32, device)
    x.requires_grad_()
    A.requires_grad_()
    y = lora_linear(x, w[:0], None, A, B[:, :0], 0.5)
    assert y.shape == (5, 0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(A.grad, torch.zeros_like(A))


def test_meta_tensors_take_the_reference_path():
    x, w, b, A, B = (t.to("meta") for t in make_inputs((5,), 40, 36, 4, torch.float32, "cpu"))
    assert lora_linear(x, w, b, A, B, 0.5).shape == (5, 36)


def test_replace_on_a_wrapped_layer_is_a_no_op():
    layer = LinearWithLoRA(nn.Linear(4, 4), 2, 1.0)
    assert replace_linear_with_lora(layer, 2, 1.0) is layer and isinstance(layer.linear, nn.Linear)


def test_replace_checks_arguments_and_targets():
    with pytest.raises(ValueError, match="rank"):
        replace_linear_with_lora(nn.Sequential(nn.ReLU()), 0, 1.0)
    with pytest.raises(ValueError, match="target_modules: .* matched no linear layer"):
        replace_linear_with_lora(nn.Sequential(nn.Linear(4, 4)), 2, 1.0, target_modules=["nomatch"])
    with pytest.raises(TypeError, match="exclude"):
        replace_linear_with_lora(nn.Sequential(nn.Linear(4, 4)), 2, 1.0, exclude=5)
    with pytest.raises(TypeError, match="target_modules"):
        replace_linear_with_lora(nn.Sequential(nn.Linear(4, 4)), 2, 1.0, target_modules=5)
    with pytest.raises(ValueError, match="LazyLinear"):
        LinearWithLoRA(nn.LazyLinear(4), 2, 1.0)


def test_tensor_alpha_is_stored_as_a_number(tmp_path):
    model = replace_linear_with_lora(nn.Sequential(nn.Linear(6, 5)), 2, torch.tensor(8.0))
    assert model[0].lora.alpha == 8.0 and isinstance(model[0].lora.alpha, float)
    assert LoRALayer(3, 3, 2, 16).alpha == 16
    save_lora(model, tmp_path / "a.safetensors")
    load_lora(model, tmp_path / "a.safetensors")


def test_merge_refuses_tied_weights():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    model[1].weight = model[0].weight
    replace_linear_with_lora(model, 2, 1.0)
    with pytest.raises(ValueError, match="shared"):
        merge_lora(model)
    assert not model[0].merged and not model[1].merged


def test_merged_state_dict_warns():
    layer = LinearWithLoRA(nn.Linear(6, 5), 2, 1.0)
    merge_lora(layer)
    with pytest.warns(UserWarning, match="applies the update twice"):
        layer.state_dict()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(scale=1e39), ValueError, "float32"), (dict(scale=10**400), ValueError, "scale"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p"), (dict(dropout_p=None), TypeError, "dropout_p"),
    (dict(training="no"), TypeError, "training"),
    (dict(scale=torch.tensor(2.0, requires_grad=True)), ValueError, "requires grad"),
])
def test_scalar_arguments(kwargs, error, match):
    x, w, b, A, B = make_inputs((5,), 8, 6, 2, torch.float32, "cpu")
    args = {**dict(scale=1.0, dropout_p=0.0, training=True), **kwargs}
    with pytest.raises(error, match=match):
        lora_linear(x, w, b, A, B, args["scale"], dropout_p=args["dropout_p"], training=args["training"])


def test_one_element_tensor_dropout_is_accepted(device):
    x, w, b, A, B = make_inputs((5,), 8, 6, 2, torch.float32, device)
    y = lora_linear(x, w, b, A, B, 1.0, dropout_p=torch.tensor(0.0))
    assert y.shape == (5, 6)
