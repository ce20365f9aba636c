"""model=resnet: torchvision topologies with a ResidualStack in every stage."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import compose_config, validate_job
from runner.errors import ConfigError
from runner.models import MODELS, build_model
from runner.resnet import ARCHS


def resnet(arch="resnet18", *, width=4, init="iid", grad="backprop", depths=None,
           stem="cifar", weights=None, shape=(3, 16, 16), classes=10, method="euler"):
    return MODELS["resnet"](shape, classes, width=width, init=init, method=method, grad=grad,
                            arch=arch, stem=stem, depths=depths, weights=weights)


def test_stages_follow_torchvision():
    model = resnet("resnet50", init="tied")
    blocks = ARCHS["resnet50"][1]
    for stage, n_blocks in zip(model.stages(), blocks, strict=True):
        assert isinstance(stage.first, torchvision.models.resnet.Bottleneck)
        assert stage.first.downsample is not None   # 64 -> 256 channels, then stride 2
        assert stage.stack.depth == n_blocks - 1
        assert stage.stack.step_size == pytest.approx(1 / (n_blocks - 1))
        # tied within the stage: one set of parameters (each layer keeps its BatchNorm buffers)
        assert len({id(p) for p in stage.stack.parameters()}) == \
            len(list(stage.stack.functions[0].parameters()))
    untied = resnet("resnet50", init="iid")
    n_tied = sum(p.numel() for p in model.parameters())
    assert n_tied < sum(p.numel() for p in untied.parameters())
    assert [s.depth for s in resnet("resnet18", depths=[3, 1, 2, 5]).stacks()] == [3, 1, 2, 5]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("grad", ["backprop", "adjoint"])
def test_forward_backward(arch, grad):
    torch.manual_seed(0)
    model = resnet(arch, grad=grad, init="tied", stem="imagenet", shape=(3, 32, 32))
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    logits = model(x)
    assert logits.shape == (3, 10)
    F.cross_entropy(logits, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(s.grad_mode.name == grad for s in model.stacks())


def _gradient(depth, init, grad):
    torch.manual_seed(0)
    model = resnet("resnet18", init=init, grad=grad, depths=[depth] * 4).double()
    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    loss = F.cross_entropy(model(x), y)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def test_adjoint_gradient_against_backprop():
    """float64. With zero-initialised residual functions (f = 0: the rebuild is exact) the
    adjoint equals backprop; with tied weights its error falls with the depth per stage."""
    exact, approx = _gradient(2, "zero", "backprop"), _gradient(2, "zero", "adjoint")
    assert torch.allclose(approx, exact, rtol=1e-10, atol=1e-12) and exact.norm() > 0

    errors = []
    for depth in (2, 8):
        exact, approx = _gradient(depth, "tied", "backprop"), _gradient(depth, "tied", "adjoint")
        errors.append(((approx - exact).norm() / exact.norm()).item())
    assert errors[0] > 1e-3            # not exact: the rebuild is approximate
    assert errors[1] < errors[0] / 3   # first order in 1/N would give 4x


def _reference_forward(tv, x):
    """torchvision's forward with the ReLU after the addition removed in every block
    but the first of each stage: what our model computes."""
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
        x = layer[0](x)
        for b in layer[1:]:
            out = b.relu(b.bn1(b.conv1(x)))
            if isinstance(b, torchvision.models.resnet.Bottleneck):
                out = b.bn3(b.conv3(b.relu(b.bn2(b.conv2(out)))))
            else:
                out = b.bn2(b.conv2(out))
            x = x + out
    return tv.fc(torch.flatten(tv.avgpool(x), 1))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_weights(tmp_path, arch):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():   # non-trivial BatchNorm statistics, so that buffers are checked too
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    path = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), path)

    ours = resnet(arch, width=64, stem="imagenet", weights=str(path), classes=1000,
                  shape=(3, 32, 32))
    assert torch.equal(ours.layer2.stack.functions[0].conv1.weight, tv.layer2[1].conv1.weight)
    assert torch.equal(ours.layer3.first.downsample[0].weight, tv.layer3[0].downsample[0].weight)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        a, b = ours.double().eval()(x), _reference_forward(tv.double().eval(), x)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())

    if arch != "resnet18":
        return   # the rest needs only one arch: big models cost seconds to build
    # Another number of classes: everything but the classifier is loaded.
    ten = resnet(arch, width=64, stem="imagenet", weights=str(path), classes=10)
    assert ten.fc.weight.shape == (10, ten.fc.in_features)
    assert torch.equal(ten.layer1.first.conv1.weight, tv.layer1[0].conv1.weight.float())
    with pytest.raises(ConfigError, match="does not fit this model.*conv1.weight"):
        resnet(arch, width=64, stem="cifar", weights=str(path))   # a 3x3 stem conv
    with pytest.raises(ConfigError, match="does not fit this model.*missing"):
        resnet(arch, width=64, stem="imagenet", weights=str(path), depths=[1, 1, 1, 2])


def test_weights_through_the_config(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), path)
    cfg = compose_config("train", ["model=resnet", "dataset=synthetic", "dataset.shape=[3,32,32]",
                                   "init=iid", f"model.pretrained={path}"], tmp_path)
    validate_job("train", cfg)
    model = build_model(cfg, (3, 32, 32), 10)
    state = torch.load(path)
    assert torch.equal(model.fc.weight, state["fc.weight"])

    bad = {"method=heun": "needs >= 2 residual functions per stage",
           "init=tied": "init=tied",
           "model.pretrained=/no/such/file.pth": "no such file",
           "model.arch=resnet200": "model.arch",
           "model.blocks=[2,2]": "model.blocks"}
    for override, message in bad.items():
        overrides = ["model=resnet", "dataset=synthetic", "dataset.shape=[3,32,32]", "init=iid",
                     f"model.pretrained={path}", override]
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            validate_job("train", compose_config("train", overrides, tmp_path))
    with pytest.raises(ConfigError, match="needs image data"):
        validate_job("train", compose_config("train", ["model=resnet", "dataset=synthetic"], tmp_path))
