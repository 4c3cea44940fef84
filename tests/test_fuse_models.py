"""dynnet_ext.fuse on real transformer models, built from their libraries' own classes with their
default activations (random init, nothing downloaded): a timm ViT (nn.GELU), a transformers BERT
(GELUActivation) and a transformers Llama (SiLUActivation, in the gated MLP act(gate(x)) * up(x)).
fuse must turn each MLP's first Linear and its activation into one fused layer, say so in its
report, and leave a model that computes what the original computes: the same outputs and
gradients in train and eval mode (dropout included: both sides draw the same masks), with the
fused kernels running.

timm and transformers are test-only dependencies (requirements-dev.txt); without them these
tests skip."""

import pytest
import torch
from torch import nn

from conftest import tol
from dynnet_ext import fuse
from dynnet_ext.nn import FusedLinearGELU, FusedLinearSiLU

KERNELS = ("linear_relu", "linear_relu_backward")
F32 = tol(torch.float32)
DEPTH = 2  # transformer blocks in each model


def vit():
    """timm's VisionTransformer, tiny, default act_layer (nn.GELU): each block's Mlp is
    fc1 -> act -> drop1 -> norm -> fc2 -> drop2."""
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    model = vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=DEPTH, num_heads=2,
                                                 num_classes=10)
    return model, (torch.randn(4, 3, 32, 32),), lambda out: out


def bert():
    """transformers' BertModel, tiny, default hidden_act "gelu" (GELUActivation): each layer's
    BertIntermediate is dense -> act. Default dropout (0.1) in train mode."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=DEPTH, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=32)
    assert config.hidden_act == "gelu"
    return transformers.BertModel(config), (torch.randint(0, 128, (2, 16)),), lambda out: out.last_hidden_state


def llama():
    """transformers' LlamaModel, tiny, default hidden_act "silu" (SiLUActivation): each layer's
    LlamaMLP is down(act(gate(x)) * up(x)), so the gate Linear feeds only the activation."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=DEPTH, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32)
    assert config.hidden_act == "silu"
    return transformers.LlamaModel(config), (torch.randint(0, 128, (2, 16)),), lambda out: out.last_hidden_state


# name: (builder, {fused Linear: (the activation form the report names, activation, fused class)})
MODELS = {
    "timm-vit": (vit, {f"blocks.{i}.mlp.fc1": ("nn.GELU 'act'", "gelu", FusedLinearGELU) for i in range(DEPTH)}),
    "transformers-bert": (bert, {f"encoder.layer.{i}.intermediate.dense":
                                 ("GELUActivation 'intermediate_act_fn'", "gelu", FusedLinearGELU)
                                 for i in range(DEPTH)}),
    "transformers-llama": (llama, {f"layers.{i}.mlp.gate_proj": ("SiLUActivation 'act_fn'", "silu", FusedLinearSiLU)
                                   for i in range(DEPTH)}),
}
LABELS = {"gelu": "GELU", "silu": "SiLU"}


def spread(model):
    """Re-draw every Linear's weight and bias at unit scale. The libraries' own init (std 0.02,
    zero bias) keeps the activations' inputs within a few hundredths of 0, where GELU's two forms
    and SiLU differ by less than the float32 tolerance; at unit scale a wrong activation, or a
    lost bias, shows in the outputs."""
    with torch.no_grad():
        for m in model.modules():
            if type(m) is nn.Linear:
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=0.5)


def outputs_and_grads(model, inputs, output, mode):
    """The model's output and {name: gradient} of its parameters (None where the output does not
    depend on one, e.g. BERT's pooler) after a backward of a fixed incoming gradient."""
    model.train(mode == "train")
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(7)  # the same dropout masks on both sides
    out = output(model(*inputs))
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out))
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fuse_real_model(name, mode, device, ran):
    build, expected = MODELS[name]
    torch.manual_seed(0)
    model, inputs, output = build()
    spread(model)
    model = model.to(device)
    inputs = tuple(t.to(device) for t in inputs)
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}

    fused, report = fuse(model, report=True)

    # Each MLP's Linear + activation pair, and only those, fused into the matching layer.
    assert dict(report.fused) == {lin: form for lin, (form, _, _) in expected.items()}
    assert report.activations == {lin: act for lin, (_, act, _) in expected.items()}
    for lin, (_, activation, cls) in expected.items():
        layer = fused.get_submodule(lin)
        assert type(layer) is cls and layer.activation == activation
    # Every other Linear is accounted for: no activation after it, or in an untraceable module
    # (attention, with its optional mask) with no activation in sight - nothing left alone with a
    # warning.
    assert report.skipped == [] and set(report.kept) | {lin for lin, _ in report.untraced} == linears - set(expected)
    assert any("attn" in lin or "attention" in lin for lin, _ in report.untraced)
    counts = {act: sum(a == act for _, a, _ in expected.values()) for act in LABELS}
    for act, n in counts.items():
        if n:
            assert f"{n} Linear+{LABELS[act]} fused" in str(report).splitlines()[0]
    for lin, (form, activation, _) in expected.items():
        assert f"  fused    {lin} + {form} (Linear+{LABELS[activation]})" in str(report).splitlines()
    # The same Parameter objects under the same names.
    assert [(n, id(p)) for n, p in fused.named_parameters()] == [(n, id(p)) for n, p in model.named_parameters()]
    assert list(fused.state_dict()) == list(model.state_dict())

    with ran(*KERNELS, device=device):
        got, got_grads = outputs_and_grads(fused, inputs, output, mode)
    want, want_grads = outputs_and_grads(model, inputs, output, mode)
    torch.testing.assert_close(got, want, **F32)
    assert [n for n, g in got_grads.items() if g is None] == [n for n, g in want_grads.items() if g is None]
    for n, g in got_grads.items():
        if g is not None:
            # F32 plus 64 float32 ulp of the gradient's largest element: rounding differences of
            # a few ulp (the engine's sums, the kernels' SiLU) grow through a block's norms and
            # attention past F32's atol in a gradient of size ~500 (Llama's embeddings; stock's
            # own float32 gradient is as far from the float64 model's).
            scale = want_grads[n].abs().max().item()
            torch.testing.assert_close(g, want_grads[n], rtol=F32["rtol"],
                                       atol=F32["atol"] + 64 * torch.finfo(torch.float32).eps * scale,
                                       msg=lambda m, n=n: f"gradient of {n}: {m}")
