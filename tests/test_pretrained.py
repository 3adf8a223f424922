import pytest
import torch
import torchvision
from torch import nn

from policycascade.costs import count_macs
from policycascade.models import pretrained_cascade
from policycascade.models.pretrained import torchvision_classifier

SHAPE = (3, 64, 64)


def small(models, **kwargs):
    return pretrained_cascade(models, weights=None, input_shape=SHAPE, num_classes=10, **kwargs)


@pytest.fixture(scope="module")
def cascade():
    torch.manual_seed(0)
    return small(["resnet18", "mobilenet_v3_small"])


def test_random_cascade_is_sorted_cheapest_first_with_counted_macs(cascade):
    assert cascade.names == ["mobilenet_v3_small", "resnet18"]
    sample = torch.zeros(1, *SHAPE)
    macs = [count_macs(clf, sample) for clf in cascade.classifiers]
    assert cascade.classifier_macs() == macs and macs[0] < macs[1]
    assert cascade(torch.rand(2, *SHAPE)).shape == (2, 2, 10)


def test_order_is_checked_when_not_sorted():
    wide, narrow = (nn.Sequential(nn.Flatten(), nn.LazyLinear(n), nn.Linear(n, 10)) for n in (9, 3))
    with pytest.raises(ValueError, match="cheapest first"):
        small([wide, narrow], sort_by_macs=False)
    assert small([wide, narrow], names=["wide", "narrow"]).names == ["narrow", "wide"]


def test_a_local_state_dict_file_loads(tmp_path):
    torch.manual_seed(1)
    source = torchvision_classifier("mobilenet_v3_small", num_classes=10)
    path = tmp_path / "mnv3.pth"
    torch.save(source.state_dict(), path)
    own = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 10))
    own_path = tmp_path / "linear.pt"
    torch.save(own.state_dict(), own_path)
    cascade = pretrained_cascade(
        ["mobilenet_v3_small", nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 10))],
        weights=[path, str(own_path)],
        input_shape=SHAPE,
        num_classes=10,
        names=["mnv3", "linear"],
    )
    assert cascade.names == ["linear", "mnv3"]  # a linear map costs fewer MACs
    for loaded, original in ((cascade.classifiers[1], source), (cascade.classifiers[0], own)):
        for a, b in zip(loaded.state_dict().values(), original.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_wrong_or_missing_files_are_named(tmp_path):
    other = tmp_path / "five_classes.pth"
    torch.save(torchvision_classifier("mobilenet_v3_small", num_classes=5).state_dict(), other)
    with pytest.raises(ValueError, match="does not hold mobilenet_v3_small weights"):
        torchvision_classifier("mobilenet_v3_small", other, num_classes=10)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a torch state-dict file"):
        torchvision_classifier("mobilenet_v3_small", junk, num_classes=10)
    with pytest.raises(FileNotFoundError, match="weights=None"):
        torchvision_classifier("mobilenet_v3_small", tmp_path / "absent.pth", num_classes=10)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="did you mean.*resnet18"):
        torchvision_classifier("resnet19")


def test_weights_that_cannot_be_downloaded_say_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="weights=None"):
        pretrained_cascade(["mobilenet_v3_small", "resnet18"], input_shape=SHAPE)
    with pytest.raises(ValueError, match="1000 classes"):
        torchvision_classifier("resnet18", "DEFAULT", num_classes=10)
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        torchvision_classifier("resnet18", "IMAGENET9K")
