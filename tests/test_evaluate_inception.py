"""The FID Inception loading path: a local pytorch-fid style state dict, read safely, with clear errors."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from attnlab.errors import CheckpointError
from attnlab.evaluate import fid_kid, load_inception
from attnlab.evaluate.inception import FID_FEATURES, FIDInception


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A randomly initialised FID Inception saved as pytorch-fid saves it (a plain state dict)."""
    torch.manual_seed(0)
    model = FIDInception()
    for m in model.modules():  # non-trivial BatchNorm statistics, so loading them is checked too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return path, model.eval()


def test_loaded_inception_reproduces_the_saved_network(inception_file):
    path, reference = inception_file
    loaded = load_inception(path)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    feats = loaded(x)
    assert feats.shape == (3, FID_FEATURES)
    torch.testing.assert_close(feats, reference(x))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_inception_takes_grey_images_and_feeds_fid(inception_file):
    path, _ = inception_file
    net = load_inception(path)
    grey = torch.rand(6, 1, 16, 16) * 2 - 1
    assert net(grey).shape == (6, FID_FEATURES)
    # With 6 samples and 2048 features the covariances are singular, but FID of a set with itself is still 0.
    assert abs(fid_kid(grey, grey, net, kid_subset_size=3)["fid"]) < 1e-6


def test_safetensors_copy_loads_the_same(inception_file, tmp_path):
    path, reference = inception_file
    copy = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in torch.load(path, weights_only=True).items()}, str(copy))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(load_inception(copy)(x), reference(x))


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"fc.weight": _Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="cannot read as a tensor state dict"):
        load_inception(path)


def test_wrong_files_name_the_file_and_what_was_expected(tmp_path, inception_file):
    path, _ = inception_file
    with pytest.raises(CheckpointError, match="not found"):
        load_inception(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not weights")
    with pytest.raises(CheckpointError, match=r"garbage\.pth: cannot read"):
        load_inception(garbage)
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(3, 3).state_dict(), other)
    with pytest.raises(
        CheckpointError, match=r"other\.pth: not FID Inception weights .*pt_inception-2015-12-05"
    ):
        load_inception(other)
    state = torch.load(path, weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head, not the FID graph's
    state["fc.bias"] = torch.zeros(1000)
    imagenet = tmp_path / "imagenet.pth"
    torch.save(state, imagenet)
    with pytest.raises(
        CheckpointError, match=r"'fc.weight' has shape \(1000, 2048\), expected \(1008, 2048\)"
    ):
        load_inception(imagenet)


def test_feature_network_prefers_local_inception_for_images_only(inception_file):
    from attnlab.errors import ConfigError
    from attnlab.evaluate import Evaluator, feature_network

    path, _ = inception_file
    assert isinstance(feature_network("digits", inception=path), FIDInception)
    assert feature_network("digits").num_features == Evaluator.load("digits").net.num_features == 128 + 16
    with pytest.raises(ConfigError, match="Inception features are for images"):
        feature_network("tones", inception=path)
