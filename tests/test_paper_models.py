"""The paper-scale classifiers: their measured MACs against the papers, shapes and weight files."""

import pytest
import torch
import torchvision

from policycascade.costs import count_macs
from policycascade.models.imagenet import (
    CIFAR_CLASSIFIERS,
    IMAGENET_CLASSIFIERS,
    cifar_classifier,
    imagenet_classifier,
)
from policycascade.models.paper import PAPER_CASCADES, cost_table
from policycascade.models.resnet import cifar_resnet, wide_resnet40

IMAGENET_SAMPLE = torch.zeros(1, 3, 224, 224)
CIFAR_SAMPLE = torch.zeros(1, 3, 32, 32)


@pytest.fixture(scope="module")
def imagenet_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: imagenet_classifier(name).eval() for name in IMAGENET_CLASSIFIERS}


@pytest.fixture(scope="module")
def cifar_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: cifar_classifier(name, num_classes=100).eval() for name in CIFAR_CLASSIFIERS}


@pytest.fixture(scope="module")
def cifar_table() -> dict:
    return cost_table("cifar-resnet")


def test_cifar_resnet_shares_are_within_one_point_of_guan_table1(cifar_table):
    paper = [5.82, 16.90, 27.98, 50.14, 100.0]
    measured = [100 * stage["share"] for stage in cifar_table["stages"]]
    assert measured == pytest.approx(paper, abs=1.0)


def test_cifar_resnet_cost_table_has_five_stages_rising_to_one(cifar_table):
    stages = cifar_table["stages"]
    assert [s["name"] for s in stages] == [
        "resnet8",
        "resnet20",
        "resnet32",
        "resnet56",
        "resnet110",
    ]
    shares = [s["share"] for s in stages]
    assert all(a < b for a, b in zip(shares, shares[1:], strict=False))
    assert shares[-1] == 1.0
    assert cifar_table["input_shape"] == [3, 32, 32]
    paper_share = [s["paper_share"] for s in stages]
    assert paper_share == pytest.approx([0.0582, 0.169, 0.2798, 0.5014, 1], abs=1e-4)


def test_wide_resnet40_macs_are_within_one_percent_of_guan_table1():
    paper_mflops = {1: 85.64, 1.5: 192.36, 2: 341.68, 3: 768.13, 4: 1364.97}
    for width, mflops in paper_mflops.items():
        macs = count_macs(wide_resnet40(width), CIFAR_SAMPLE)
        assert macs / 1e6 == pytest.approx(mflops, rel=0.01), width


def test_imagenet_mobilenet_v2_is_within_five_percent_of_314m_macs(imagenet_models):
    assert count_macs(imagenet_models["mobilenet_v2"], IMAGENET_SAMPLE) == pytest.approx(
        314.13e6, rel=0.05
    )


def test_imagenet_resnet152_is_within_five_percent_of_11_56g_macs(imagenet_models):
    assert count_macs(imagenet_models["resnet152"], IMAGENET_SAMPLE) == pytest.approx(
        11.559e9, rel=0.05
    )


def test_imagenet_classifiers_map_a_batch_to_1000_logits(imagenet_models):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for name, model in imagenet_models.items():
            assert model(x).shape == (2, 1000), name


def test_googlenet_returns_plain_logits_in_train_mode(imagenet_models):
    model = imagenet_models["googlenet"].train()
    try:
        with torch.no_grad():
            out = model(torch.randn(2, 3, 96, 96))
    finally:
        model.eval()
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1000)


def test_cifar_classifiers_map_a_batch_to_num_classes_logits(cifar_models):
    with torch.no_grad():
        for name, model in cifar_models.items():
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100), name


def test_cifar_classifier_macs_are_within_eleven_percent_of_ltc_table1(cifar_models):
    # LtC counted with thop (batch norm, biases, linear adds too), so ours run a little lower.
    paper = {"mobilenet_v2": 67.6e6, "vgg11": 191.8e6, "resnet18": 556.8e6}
    for name, macs in paper.items():
        measured = count_macs(cifar_models[name], CIFAR_SAMPLE)
        assert 0.89 * macs < measured <= macs, name


def test_resnets_for_32x32_map_a_batch_to_num_classes_logits():
    for model, classes in [(cifar_resnet(8, 10), 10), (wide_resnet40(1.5, 1000), 1000)]:
        with torch.no_grad():
            assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, classes)


def test_cifar_resnet_rejects_a_depth_that_is_not_6n_plus_2():
    with pytest.raises(ValueError, match="depth"):
        cifar_resnet(21)


def test_local_weights_file_round_trips(tmp_path, imagenet_models):
    source = imagenet_models["resnet18"]
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    loaded = imagenet_classifier("resnet18", weights=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


@pytest.fixture(scope="module")
def googlenet_with_heads() -> dict[str, torch.Tensor]:
    """A state dict laid out like torchvision's pretrained GoogLeNet file (auxiliary heads)."""
    return torchvision.models.GoogLeNet(aux_logits=True, init_weights=False).state_dict()


def test_local_googlenet_file_with_auxiliary_heads_loads(tmp_path, googlenet_with_heads):
    path = tmp_path / "googlenet.pt"
    torch.save(googlenet_with_heads, path)
    loaded = imagenet_classifier("googlenet", weights=str(path))
    assert loaded.aux1 is None and loaded.transform_input
    torch.testing.assert_close(loaded.fc.weight, googlenet_with_heads["fc.weight"], rtol=0, atol=0)


def test_default_googlenet_weights_give_plain_logits_in_train_mode(
    monkeypatch, googlenet_with_heads
):
    # Stands in for the download: the same layout as torchvision's DEFAULT file.
    monkeypatch.setattr(
        torchvision.models.GoogLeNet_Weights,
        "get_state_dict",
        lambda self, *args, **kwargs: googlenet_with_heads,
    )
    model = imagenet_classifier("googlenet", weights="default").train()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 96))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1000)


def test_missing_weights_file_raises_naming_the_path(tmp_path):
    path = tmp_path / "nowhere" / "resnet18.pt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        imagenet_classifier("resnet18", weights=str(path))


def test_unknown_names_raise_listing_the_choices():
    with pytest.raises(ValueError, match="resnet152"):
        imagenet_classifier("resnet101")
    with pytest.raises(ValueError, match="vgg11"):
        cifar_classifier("alexnet")
    with pytest.raises(ValueError, match="cifar-resnet"):
        cost_table("nope")


def test_every_paper_cascade_has_one_name_and_share_per_stage():
    for name, spec in PAPER_CASCADES.items():
        assert spec.paper_share is None or len(spec.paper_share) == len(spec.stage_names), name
        assert spec.paper_share is None or max(spec.paper_share) == 1.0, name
