"""Adaptation models, and rebuilding one from a checkpoint."""

import pytest
import torch

from adaptation.checkpoint import CHECKPOINT_KEYS, load_checkpoint
from adaptation.models import build_model, model_kwargs
from toolkit.utils import UserError


def test_original_is_linear_without_bias_then_relu():
    m = build_model("original", 6)
    assert m.weight_matrix.weight.shape == (1024, 6) and m.weight_matrix.bias is None
    x = torch.randn(5, 6)
    assert torch.equal(m(x), torch.relu(x @ m.weight_matrix.weight.T))
    assert m.out_dim == 1024 and model_kwargs(m) == {"out_dim": 1024}
    assert build_model("original", 6, out_dim=8)(x).shape == (5, 8)


def test_peterson_starts_as_identity_and_clips_negative_weights():
    m = build_model("peterson", 4)
    x = torch.randn(3, 4)
    assert torch.equal(m(x), x)
    with torch.no_grad():
        m.W.copy_(torch.tensor([2.0, -1.0, 0.5, 1.0]))
    assert torch.equal(m(x), x * torch.tensor([2.0, 0.0, 0.5, 1.0]))


def test_dummy_is_identity_without_parameters():
    m = build_model("dummy", 4)
    x = torch.randn(2, 4)
    assert m(x) is x and not list(m.parameters()) and m.out_dim == 4


def test_bad_model_requests():
    with pytest.raises(UserError, match="unknown model"):
        build_model("resnet", 4)
    with pytest.raises(UserError, match="positive"):
        build_model("original", 0)
    with pytest.raises(UserError, match="does not take"):
        build_model("peterson", 4, out_dim=3)


def test_load_checkpoint_rebuilds_the_model(tmp_path):
    m = build_model("original", 5, out_dim=7)
    ckpt = {k: None for k in CHECKPOINT_KEYS}
    ckpt.update(epoch=3, state_dict=m.state_dict(), config={"data": "/x.npy"}, model_name="original",
                in_dim=5, model_kwargs={"out_dim": 7}, test_names=["a", "b"])
    torch.save(ckpt, tmp_path / "c.pt")
    loaded, got = load_checkpoint(tmp_path / "c.pt")
    x = torch.randn(2, 5)
    assert torch.equal(loaded(x), m(x)) and not loaded.training
    assert got["test_names"] == ["a", "b"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="not a train.py checkpoint"):
        load_checkpoint(tmp_path / "partial.pt")
