"""Bad input raises a clear error naming the argument, before any launch."""

import math

import pytest
import torch

from lora_fast import LinearWithLoRA, LoRALayer, lora_linear, reference


def _ok(device="cpu"):
    return dict(x=torch.randn(4, 8, device=device), weight=torch.randn(6, 8, device=device),
                bias=torch.randn(6, device=device), A=torch.randn(8, 2, device=device),
                B=torch.randn(2, 6, device=device), scale=2.0)


BAD = [
    ("x", dict(x=torch.randn(4, 7)), ValueError, "x: expected last dim in_features=8"),
    ("weight", dict(weight=torch.randn(6, 8, 1)), ValueError, "weight: expected a 2-D tensor"),
    ("A rows", dict(A=torch.randn(7, 2)), ValueError, "A: expected shape \\(in_features=8"),
    ("rank 0", dict(A=torch.randn(8, 0), B=torch.randn(0, 6)), ValueError, "rank >= 1"),
    ("B shape", dict(B=torch.randn(3, 6)), ValueError, "B: expected shape \\(rank=2, out_features=6\\)"),
    ("B out", dict(B=torch.randn(2, 5)), ValueError, "B: expected shape"),
    ("bias", dict(bias=torch.randn(5)), ValueError, "bias: expected shape \\(6,\\)"),
    ("int x", dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x: expected a floating-point dtype"),
    ("int A", dict(A=torch.ones(8, 2, dtype=torch.int32)), TypeError, "A: expected a floating-point dtype"),
    ("weight dtype", dict(weight=torch.randn(6, 8, dtype=torch.float16)), TypeError, "weight: expected x's dtype"),
    ("B dtype", dict(B=torch.randn(2, 6, dtype=torch.float64)), TypeError, "B: expected A's dtype"),
    ("scale nan", dict(scale=math.nan), ValueError, "scale: expected a finite number"),
    ("scale inf", dict(scale=math.inf), ValueError, "scale: expected a finite number"),
    ("scale str", dict(scale="2"), TypeError, "scale: expected a real number"),
    ("x list", dict(x=[[1.0] * 8]), TypeError, "x: expected a torch.Tensor"),
]


@pytest.mark.parametrize("fn", [lora_linear, reference.lora_linear], ids=["fused", "reference"])
@pytest.mark.parametrize("name,override,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(fn, name, override, error, match):
    args = {**_ok(), **override}
    with pytest.raises(error, match=match):
        fn(args["x"], args["weight"], args["bias"], args["A"], args["B"], args["scale"])


@pytest.mark.parametrize("p", [-0.1, 1.0001, 1.5, float("nan")])
def test_bad_dropout(p):
    args = _ok()
    with pytest.raises(ValueError, match="dropout_p: expected a probability in \\[0, 1\\]"):
        lora_linear(*args.values(), dropout_p=p)
    with pytest.raises(ValueError, match="dropout: expected a probability"):
        LinearWithLoRA(torch.nn.Linear(8, 6), 2, 1.0, dropout=p)


def test_other_device_raises():
    args = _ok()
    args["A"] = torch.randn(8, 2, device="meta")
    with pytest.raises(ValueError, match="A: expected a tensor on x's device cpu, got meta"):
        lora_linear(*args.values())


@pytest.mark.parametrize("rank", [0, -3, 2.5])
def test_bad_rank_in_layers(rank):
    with pytest.raises(ValueError, match="rank: expected an integer >= 1"):
        LoRALayer(8, 6, rank, 1.0)
    with pytest.raises(ValueError, match="rank: expected an integer >= 1"):
        LinearWithLoRA(torch.nn.Linear(8, 6), rank, 1.0)


def test_bad_alpha_and_scaling():
    with pytest.raises(ValueError, match="alpha: expected a finite number"):
        LoRALayer(8, 6, 2, float("inf"))
    with pytest.raises(ValueError, match="scaling: expected one of"):
        LoRALayer(8, 6, 2, 1.0, scaling="alpha*rank")
    with pytest.raises(TypeError, match="linear: expected a torch.nn.Linear"):
        LinearWithLoRA(torch.nn.Conv1d(8, 6, 1), 2, 1.0)
