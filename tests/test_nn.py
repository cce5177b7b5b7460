"""dlfast.nn drop-in layers and the converter."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import tol

import dlfast


@pytest.mark.parametrize(
    "kwargs",
    [
        {"normalized_shape": 16},
        {"normalized_shape": (4, 8), "eps": 1e-6},
        {"normalized_shape": 16, "elementwise_affine": False},
        {"normalized_shape": 16, "bias": False},
        {"normalized_shape": 16, "dtype": torch.float64},
    ],
)
def test_layer_norm_is_a_drop_in(kwargs):
    ours, theirs = dlfast.nn.LayerNorm(**kwargs), torch.nn.LayerNorm(**kwargs)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    assert repr(ours) == repr(theirs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, *ours.normalized_shape, dtype=kwargs.get("dtype", torch.float32))
    torch.testing.assert_close(ours(x), theirs(x), **tol(x.dtype))


def test_convert_a_transformer_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.TransformerEncoderLayer(
            d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        ),
        torch.nn.LayerNorm(32),
    )
    model.train()  # the eval fast path of TransformerEncoderLayer bypasses module forwards
    twin = copy.deepcopy(model)
    dlfast.nn.convert(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3 and all(type(m) is dlfast.nn.LayerNorm for m in norms)
    assert model.state_dict().keys() == twin.state_dict().keys()

    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(model(x), twin(x), **tol(torch.float32))
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **tol(torch.float32), msg=name)

    dlfast.nn.revert(model)
    assert all(type(m) is torch.nn.LayerNorm for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def test_convert_leaves_user_subclasses_alone():
    class MyNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(MyNorm(8))
    dlfast.nn.convert(model)
    assert type(model[0]) is MyNorm


def _grads(model):
    return [p.grad for p in model.parameters()]


def _same_outputs_and_gradients(ours, theirs, *inputs, **kwargs):
    out_ours, out_theirs = ours(*inputs, **kwargs), theirs(*inputs, **kwargs)
    if isinstance(out_ours, tuple):
        out_ours, out_theirs = out_ours[0], out_theirs[0]
    torch.testing.assert_close(out_ours, out_theirs, **tol(torch.float32))
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **tol(torch.float32), msg=name)


def _kernel_backend():
    """The C++ kernel where it loaded, so the layer tests run dlfast's own attention."""
    return "cpu" if dlfast.backends.unavailable_reason("cpu") is None else "reference"


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "masks", ["none", "padding", "causal", "causal_bool", "causal_hint", "causal_and_padding", "cross"]
)
def test_multihead_attention_is_a_drop_in(batch_first, masks):
    torch.manual_seed(0)
    kdim = 24 if masks == "cross" else None
    theirs = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)
    ours = copy.deepcopy(theirs)
    dlfast.nn.convert(ours)
    assert type(ours) is dlfast.nn.MultiheadAttention
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    N, L, S = 3, 7, (5 if masks == "cross" else 7)
    query = torch.randn(N, L, 32)
    key = value = query if masks != "cross" else torch.randn(N, S, 24)
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[0, -2:] = True
    kwargs = {
        "none": {},
        "padding": {"key_padding_mask": padding},
        "causal": {"attn_mask": torch.nn.Transformer.generate_square_subsequent_mask(L)},
        "causal_bool": {"attn_mask": torch.ones(L, L, dtype=torch.bool).triu(1)},
        "causal_hint": {"attn_mask": torch.ones(L, L, dtype=torch.bool).triu(1), "is_causal": True},
        "causal_and_padding": {
            "attn_mask": torch.ones(L, L, dtype=torch.bool).triu(1),
            "key_padding_mask": padding,
        },
        "cross": {"key_padding_mask": padding},
    }[masks]
    with dlfast.use_backend(_kernel_backend()):
        _same_outputs_and_gradients(ours, theirs, query, key, value, need_weights=False, **kwargs)


def test_multihead_attention_takes_the_fused_path_only_where_it_can(monkeypatch):
    calls = []
    monkeypatch.setattr(
        dlfast.nn.attention, "attention", lambda *a, **k: calls.append(1) or dlfast.attention(*a, **k)
    )
    mha = dlfast.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    _, weights = mha(x, x, x)  # need_weights defaults to True: torch's path, which returns them
    assert weights is not None and weights.shape == (2, 5, 5) and not calls
    mha(x, x, x, need_weights=False, attn_mask=torch.randn(5, 5))  # an arbitrary float mask
    assert not calls
    _, weights = mha(x, x, x, need_weights=False)
    assert weights is None and len(calls) == 1


def test_convert_a_transformer_with_attention_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    theirs = torch.nn.Transformer(
        d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64, dropout=0.0,
        batch_first=True,
    )  # fmt: skip
    ours = dlfast.nn.convert(copy.deepcopy(theirs))
    assert sum(type(m) is dlfast.nn.MultiheadAttention for m in ours.modules()) == 3
    src, tgt = torch.randn(2, 9, 32), torch.randn(2, 6, 32)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6)
    with dlfast.use_backend(_kernel_backend()):
        _same_outputs_and_gradients(
            ours,
            theirs,
            src,
            tgt,
            tgt_mask=causal,
            src_key_padding_mask=padding,
            memory_key_padding_mask=padding,
        )


def test_converted_decoder_with_a_causal_mask_compiles_fullgraph():
    """Recognising a causal attn_mask by its values is a data-dependent branch; under
    torch.compile the layer takes torch's path for it instead of breaking the graph."""
    torch.manual_seed(0)
    theirs = torch.nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    ours = dlfast.nn.convert(copy.deepcopy(theirs))
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5)
    torch._dynamo.reset()
    with dlfast.use_backend(_kernel_backend()):
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(
            compiled(x, memory, tgt_mask=causal), theirs(x, memory, tgt_mask=causal), **tol(torch.float32)
        )


def test_causal_self_attention_matches_sdpa():
    torch.manual_seed(0)
    layer = dlfast.nn.CausalSelfAttention(d_model=32, n_heads=4)
    x = torch.randn(2, 11, 32)
    with dlfast.use_backend(_kernel_backend()):
        ours = layer(x)
    q, k, v = layer.c_attn(x).split(32, dim=2)
    q, k, v = (t.view(2, 11, 4, 8).transpose(1, 2) for t in (q, k, v))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, layer.c_proj(y.transpose(1, 2).reshape(2, 11, 32)), **tol(torch.float32))
    assert set(layer.state_dict()) == {"c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"}
    with pytest.raises(ValueError, match="must divide d_model"):
        dlfast.nn.CausalSelfAttention(30, 4)


# ---------------------------------------------------------------------------------------------
# Conv2dReLU and the Conv2d -> ReLU converter


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"stride": 2, "padding": 1, "bias": False}, {"padding": "same", "dilation": 2}, {"groups": 2}],
    ids=["default", "stride2-nobias", "same-dil2", "groups2"],
)
def test_conv2d_relu_is_a_drop_in(kwargs):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, **kwargs)
    torch.manual_seed(0)
    fused = dlfast.nn.Conv2dReLU(4, 6, 3, **kwargs)
    assert fused.state_dict().keys() == conv.state_dict().keys()
    for key, value in conv.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value), key
    x = torch.randn(2, 4, 9, 9)
    with dlfast.use_backend("cpu"):
        torch.testing.assert_close(fused(x), torch.relu(conv(x)), **tol(torch.float32))


def test_conv2d_relu_reflect_padding_mode():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    fused = dlfast.nn.Conv2dReLU.from_modules(conv, torch.nn.ReLU())
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(fused(x), torch.relu(conv(x)), **tol(torch.float32))


def test_from_modules_shares_the_parameters():
    conv, relu = torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=True)
    fused = dlfast.nn.Conv2dReLU.from_modules(conv, relu)
    assert fused.weight is conv.weight and fused.bias is conv.bias
    assert type(conv) is torch.nn.Conv2d  # left unchanged
    with pytest.raises(TypeError, match="torch.nn.ReLU"):
        dlfast.nn.Conv2dReLU.from_modules(conv, torch.nn.GELU())


class _ResNetBlock(torch.nn.Module):
    """The course notes' basic block with an identity shortcut, written with F.relu."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        out = torch.nn.functional.relu(self.conv1(x), inplace=True)
        return torch.nn.functional.relu(self.conv2(out) + x)


class _DoubleConv(torch.nn.Module):
    """U-Net's double convolution."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(cin, cout, 3, padding=1),
            torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(cout, cout, 3, padding=1),
            torch.nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.net(x)


class _MethodRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.conv(x).relu())


def _sequential_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 10),
    )


@pytest.mark.parametrize(
    "make,channels,fused",
    [
        (_sequential_cnn, 1, 2),
        (lambda: _ResNetBlock(4), 4, 1),
        (lambda: _DoubleConv(3, 4), 3, 2),
        (_MethodRelu, 3, 1),
    ],
    ids=["sequential-cnn", "resnet-block", "unet-double-conv", "tensor-method-relu"],
)
def test_convert_fuses_conv_relu_and_keeps_outputs_and_gradients(make, channels, fused):
    torch.manual_seed(0)
    model = make()
    original = copy.deepcopy(model)
    converted = dlfast.nn.convert(model)
    assert sum(isinstance(m, dlfast.nn.Conv2dReLU) for m in converted.modules()) == fused
    assert converted.state_dict().keys() == original.state_dict().keys()
    _same_model_outputs(converted, original, torch.randn(2, channels, 8, 8))


def test_convert_leaves_a_conv_whose_output_is_used_twice():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y) + y

    model = dlfast.nn.convert(Twice())
    assert not any(isinstance(m, dlfast.nn.Conv2dReLU) for m in model.modules())


def test_convert_warns_on_an_untraceable_model():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3)

        def forward(self, x):
            if x.sum() > 0:  # control flow on a value: torch.fx cannot trace it
                return torch.relu(self.conv(x))
            return self.conv(x)

    model = DataDependent()
    with pytest.warns(UserWarning, match="cannot trace"):
        assert dlfast.nn.convert(model) is model
    assert type(model.conv) is torch.nn.Conv2d


class _Holder(torch.nn.Module):
    """Forward code with a Conv2d -> F.relu pair, plus what a trace does not see: a buffer and a
    submodule the forward never uses, a method, a plain attribute, a branch on self.training."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.aux = torch.nn.Linear(4, 2)
        self.register_buffer("stat", torch.ones(4))
        self.scale = 3.0

    def forward(self, x, unused=None):
        y = torch.nn.functional.relu(self.conv(x), inplace=True) * self.stat.view(1, 4, 1, 1)
        if self.training:
            y = y * self.scale
        return torch.nn.functional.dropout(y, 0.0, training=self.training)

    def features(self, x):
        return self.aux(self(x).mean((2, 3)))


def _same_model_outputs(ours, theirs, x):
    with dlfast.use_backend(_kernel_backend()):
        _same_outputs_and_gradients(ours, theirs, x)
    ours.zero_grad()
    theirs.zero_grad()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_traced_convert_keeps_the_model_and_what_it_holds(mode):
    torch.manual_seed(0)
    model = _Holder().train(mode == "train")
    original = copy.deepcopy(model)
    assert dlfast.nn.convert(model) is model
    assert isinstance(model, _Holder) and type(model.conv) is dlfast.nn.Conv2dReLU
    assert model.state_dict().keys() == original.state_dict().keys()
    assert model.scale == 3.0
    for m in (model, original):
        m.stat.fill_(2.0)  # the traced code reads the buffer when it runs
    x = torch.randn(2, 3, 6, 6)
    for training in (True, False, True):  # the traced code follows the mode it is run in
        model.train(training)
        original.train(training)
        _same_model_outputs(model, original, x)
    torch.testing.assert_close(model.features(x), original.features(x), **tol(torch.float32))


def test_traced_convert_survives_pickle_deepcopy_and_revert():
    torch.manual_seed(0)
    model, original = _Holder(), _Holder()
    original.load_state_dict(model.state_dict())
    dlfast.nn.convert(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copied in (loaded, copy.deepcopy(model)):
        assert isinstance(copied, _Holder) and type(copied.conv) is dlfast.nn.Conv2dReLU
        assert type(model.conv) is dlfast.nn.Conv2dReLU  # the source is left as it was
        _same_model_outputs(copied, original, torch.randn(1, 3, 5, 5))
    dlfast.nn.revert(model)
    assert type(model) is _Holder and type(model.conv) is torch.nn.Conv2d
    _same_model_outputs(model, original, torch.randn(1, 3, 5, 5))


def test_traced_convert_keeps_a_forward_that_tests_an_argument_for_none():
    """A trace sees every argument as a tensor, so a branch on `mask is None` would be fixed."""

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x, mask=None):
            y = torch.relu(self.conv(x))
            return y if mask is None else y * mask

    model = Masked()
    with pytest.warns(UserWarning, match=r"computes differently when \['mask'\] are None"):
        dlfast.nn.convert(model)
    assert type(model) is Masked and type(model.conv) is torch.nn.Conv2d
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(model(x), torch.relu(model.conv(x)))


def test_convert_leaves_relu_subclasses_and_layers_with_hooks():
    class LeakyReLUInDisguise(torch.nn.ReLU):
        def forward(self, x):
            return torch.nn.functional.leaky_relu(x, 0.1)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), LeakyReLUInDisguise())
    dlfast.nn.convert(model)
    assert type(model[0]) is torch.nn.Conv2d
    seen = []
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.min().item()))
    dlfast.nn.convert(model)
    assert type(model[0]) is torch.nn.Conv2d
    model(torch.randn(1, 3, 6, 6))
    assert seen[0] < 0  # the hook still sees the conv's output, before the ReLU


def test_revert_gives_plain_pytorch_with_the_same_outputs():
    torch.manual_seed(0)
    model = dlfast.nn.convert(_DoubleConv(3, 4))
    x = torch.randn(1, 3, 8, 8)
    with dlfast.use_backend("cpu"):
        fused = model(x)
    dlfast.nn.revert(model)
    assert [type(m) for m in model.net][::2] == [dlfast.nn.Conv2dThenReLU] * 2
    torch.testing.assert_close(model(x), fused, **tol(torch.float32))
