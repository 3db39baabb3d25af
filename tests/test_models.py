"""Every registered model, at every supported patch size, gives finite logits of the right shape."""

from __future__ import annotations

import pytest
import torch

from kmnist.config import resolve_config
from kmnist.errors import KmnistError
from kmnist.models import create_model, list_models, model_defaults


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_classes", [10, 49])
def test_registered_model_gives_logits(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes)
    images = torch.randn(4, 1, 28, 28)
    model.train()
    logits = model(images)
    assert logits.shape == (4, num_classes)
    logits.sum().backward()
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (4, num_classes) and torch.isfinite(logits).all()


@pytest.mark.parametrize("patch", [2, 4, 7, 14])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("stem_norm", ["channels", "tokens"])
def test_report_mixer_patch_sizes(patch: int, residual: bool, stem_norm: str) -> None:
    model = create_model("report-mixer", patch=patch, residual=residual, stem_norm=stem_norm).eval()
    with torch.no_grad():
        logits = model(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    assert model.blocks[0].mlp_tokens[0].in_features == (28 // patch) ** 2


def test_report_mixer_matches_the_report_layout() -> None:
    model = create_model("report-mixer")
    assert model.stem.in_features == 16  # 4x4 patches
    assert model.blocks[0].mlp_tokens[0].in_features == 49 and model.blocks[0].mlp_tokens[0].out_features == 512
    assert len(model.blocks) == 2
    assert model.head.out_features == 10


@pytest.mark.parametrize("patch, stride", [(4, 4), (4, 2), (7, 7), (2, 2), (6, 2)])
def test_mixer_patches_and_strides(patch: int, stride: int) -> None:
    model = create_model("mixer", patch=patch, stride=stride, dim=32, depth=2).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert not any(isinstance(m, torch.nn.Conv2d) for m in model.modules())  # all-MLP: no convolution


@pytest.mark.parametrize("patch, stride", [(4, 2), (2, 2), (6, 2)])
def test_pyramid_mixer_merges_the_fine_grid_into_a_coarse_one(patch: int, stride: int) -> None:
    model = create_model("mixer-pyramid", patch=patch, stride=stride, dim=16, depth=1, depth2=1).eval()
    assert model.grid == 14  # 4x4 every 2 pixels on the image padded by 1; 2x2 every 2; 6x6 every 2 padded by 2
    assert model.stage1[0].mlp_tokens[0].in_features == 196 and model.stage2[0].mlp_tokens[0].in_features == 49
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert not any(isinstance(m, torch.nn.Conv2d) for m in model.modules())  # all-MLP: no convolution


def test_pyramid_mixer_merge_keeps_neighbours_together() -> None:
    """The merged token (i, j) holds the fine tokens (2i..2i+1, 2j..2j+1), nothing from elsewhere."""
    torch.manual_seed(0)
    model = create_model("mixer-pyramid", dim=8, depth=0, depth2=0).eval()
    seen = {}
    model.merge_norm.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    fine = torch.arange(196.0).reshape(1, 196, 1).expand(1, 196, 8)  # each fine token's index as its features
    model.embed = torch.nn.Identity()
    model.position = torch.nn.Parameter(torch.zeros(1, 196, 8))
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:  # unfold gives the prepared tokens
        patch.setattr(torch.nn.functional, "unfold", lambda *a, **k: fine.transpose(1, 2))
        model(torch.zeros(1, 1, 28, 28))
    merged = seen["x"].reshape(49, 4, 8)[:, :, 0]  # (coarse token, its 4 fine tokens)
    for i in range(7):
        for j in range(7):
            expected = {14 * (2 * i + a) + 2 * j + b for a in (0, 1) for b in (0, 1)}
            assert set(merged[7 * i + j].tolist()) == expected


def test_pyramid_mixer_needs_an_even_grid() -> None:
    with pytest.raises(KmnistError, match="even number of steps"):
        create_model("mixer-pyramid", patch=4, stride=4)  # 7x7: no 2x2 merge
    with pytest.raises(KmnistError, match="even number of steps"):
        create_model("mixer-pyramid", patch=4, stride=0)  # 0 means the patch, as for `mixer`


@pytest.mark.parametrize("preset", ["mixer-best", "mixer-flat"])
def test_all_mlp_presets_have_no_convolution(preset: str) -> None:
    config = resolve_config(preset=preset)
    model = create_model(config.model, **config.model_args)
    assert not any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_bad_model_arguments_are_user_errors() -> None:
    with pytest.raises(KmnistError, match="patch must divide"):
        create_model("report-mixer", patch=5)
    with pytest.raises(KmnistError, match="no argument"):
        create_model("report-mixer", bogus=1)
    with pytest.raises(KmnistError, match="unknown model"):
        create_model("no-such-model")


def test_defaults_are_introspectable() -> None:
    for name in list_models():
        assert "num_classes" not in model_defaults(name)


@pytest.mark.parametrize("name", ["resnet-small", "preact-resnet18"])
def test_convolutional_models_are_channels_last_with_the_same_outputs(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    plain = create_model(name, num_classes=10).to(memory_format=torch.contiguous_format).eval()
    plain.load_state_dict(model.state_dict())
    assert all(c.weight.is_contiguous() for c in plain.modules() if isinstance(c, torch.nn.Conv2d))
    images = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(images), plain(images), rtol=1e-4, atol=1e-4)


def _report_mixer_step(fused: bool, bf16: bool, images: torch.Tensor, labels: torch.Tensor):
    from kmnist.models.fused import set_fused

    torch.manual_seed(1)
    model = set_fused(create_model("report-mixer", token_hidden=64, channel_hidden=32), fused)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(images)
    torch.nn.functional.cross_entropy(logits.float(), labels).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if name != "stem.bias"}  # BatchNorm follows: ~0
    with torch.inference_mode():
        evaluated = model.eval()(images).float()
    return logits.detach().float(), grads, evaluated


def test_fused_linear_relu_gives_the_plain_numbers() -> None:
    torch.manual_seed(0)
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    reference = _report_mixer_step(False, False, images, labels)
    fused = _report_mixer_step(True, False, images, labels)
    # fp32: the same products, the same values.
    torch.testing.assert_close(fused[0], reference[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused[2], reference[2], atol=1e-6, rtol=1e-5)
    for name, grad in reference[1].items():
        torch.testing.assert_close(fused[1][name], grad, atol=1e-6, rtol=1e-5)
    # bf16 autocast: both paths round, so each is compared with fp32; the fused one is no further off.
    fused_bf16, plain_bf16 = _report_mixer_step(True, True, images, labels), _report_mixer_step(False, True, images, labels)
    for name, grad in reference[1].items():
        scale = grad.abs().max()
        fused_error = float((fused_bf16[1][name] - grad).abs().max() / scale)
        plain_error = float((plain_bf16[1][name] - grad).abs().max() / scale)
        assert fused_error <= 2 * plain_error + 0.01, (name, fused_error, plain_error)
    assert float((fused_bf16[0] - reference[0]).abs().max()) <= 2 * float((plain_bf16[0] - reference[0]).abs().max()) + 0.01


def test_small_resnet_pools_in_fp32_with_the_numbers_of_a_bf16_pool() -> None:
    # The fp32 global max pool (which keeps torch.compile's bf16 backward finite) changes nothing in eager bf16
    # training: the upcast is exact, so logits and gradients are those of a bf16 pool, bit for bit.
    torch.manual_seed(0)
    model = create_model("resnet-small", num_classes=10, width=4).train()
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    state = {key: value.clone() for key, value in model.state_dict().items()}

    def step(forward):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = forward(images)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        return logits.detach().float(), [parameter.grad.clone() for parameter in model.parameters()]

    logits, grads = step(model)
    bf16_logits, bf16_grads = step(lambda x: model.head(model.stages(model.stem(x)).amax(dim=(2, 3))))
    assert torch.equal(logits, bf16_logits)
    assert all(torch.equal(a, b) for a, b in zip(grads, bf16_grads))


def test_flags_given_as_0_or_1_are_flags() -> None:
    """`--model-arg residual=0` reaches the registry as the number 0 (and older runs saved it so)."""
    from kmnist.models import resolve_model_args

    assert resolve_model_args("report-mixer", {"residual": 0})["residual"] is False
    assert resolve_model_args("report-mixer", {"residual": 1})["residual"] is True
    assert create_model("report-mixer", residual=0).blocks[0].residual is False
    with pytest.raises(KmnistError, match="residual must be true or false"):
        resolve_model_args("report-mixer", {"residual": 2})
