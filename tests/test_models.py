import pytest
import torch
from torch import nn

from core.models import SplitModel, create_model, list_models, load_weights


@pytest.mark.parametrize("name", ["edge_cnn", "digits_cnn", "teacher_resnet", "timm:resnet18"])
@pytest.mark.parametrize("size", [16, 32])
def test_split_forward_equals_classifier_of_features(name: str, size: int) -> None:
    torch.manual_seed(0)
    kw = {"width": 0.25} if name == "digits_cnn" else {}
    model = create_model(name, 7, image_size=size, **kw).eval()
    assert isinstance(model, SplitModel)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        u = model.features(x)
        logits = model(x)
    assert u.shape == (3, model.embedding_dim)
    assert logits.shape == (3, 7)
    torch.testing.assert_close(model.classifier(u), logits)


def test_builtins_listed_and_unknown_names_rejected() -> None:
    assert {"edge_cnn", "digits_cnn", "teacher_resnet"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope", 10)
    with pytest.raises(ValueError, match="unknown timm model"):
        create_model("timm:not_a_real_net", 10)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("edge_cnn", 0)


def test_timm_small_input_stem_keeps_resolution() -> None:
    small = create_model("timm:resnet18", 10, image_size=32)
    big = create_model("timm:resnet18", 10, image_size=224)
    assert small.features.net.conv1.kernel_size == (3, 3)
    assert isinstance(small.features.net.maxpool, nn.Identity)
    assert big.features.net.conv1.kernel_size == (7, 7)


def test_teacher_is_larger_than_edge_model() -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(create_model("teacher_resnet", 10)) > 5 * count(create_model("edge_cnn", 10))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_round_trip(tmp_path, suffix: str) -> None:
    torch.manual_seed(1)
    src = create_model("edge_cnn", 10)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": src.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    torch.manual_seed(2)
    dst = create_model("edge_cnn", 10, weights=path)
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), k


def test_weights_mismatch_and_missing_file_are_clear(tmp_path) -> None:
    path = tmp_path / "w.pt"
    torch.save(create_model("edge_cnn", 5).state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatch: .*classifier.weight: file \(5, 64\) vs model \(10, 64\)"):
        create_model("edge_cnn", 10, weights=path)
    torch.save(create_model("teacher_resnet", 10).state_dict(), path)
    with pytest.raises(ValueError, match="missing: .*unexpected: "):
        create_model("edge_cnn", 10, weights=path)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_weights(create_model("edge_cnn", 10), tmp_path / "absent.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict, got list"):
        load_weights(create_model("edge_cnn", 10), tmp_path / "list.pt")
