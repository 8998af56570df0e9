"""verify.data loaders and the shipped digits MLP."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from verify.data import DataError, digits, eran_csv, load_data, mnist, tensor_file
from verify.digits_model import accuracy, load_digits_mlp, train_digits_mlp


def test_digits_split_shapes_and_range():
    xtr, ytr = digits("train")
    xte, yte = digits("test")
    assert xtr.shape == (1258, 1, 8, 8) and xte.shape == (539, 1, 8, 8)
    assert xte.dtype == torch.float32 and yte.dtype == torch.long
    assert 0.0 <= float(xte.min()) and float(xte.max()) <= 1.0
    assert set(yte.tolist()) == set(range(10))
    # fixed split: the same every call, and train/test are disjoint images of the full set
    assert torch.equal(digits("test", limit=5)[0], xte[:5])
    xall, _ = digits("all")
    flat = {tuple(r) for r in xall.flatten(1).tolist()}
    assert len(flat) > 0 and {tuple(r) for r in xte.flatten(1).tolist()} <= flat


@pytest.mark.parametrize("kind", ["plain", "noise"])
def test_shipped_model_accuracy(kind):
    x, y = digits("test")
    net = load_digits_mlp(kind)
    assert accuracy(net, x, y) > 0.95


def test_retraining_reproduces_accuracy():
    """The shipped plain weights come from train_digits_mlp(seed=0) (python -m verify.digits_model)."""
    x, y = digits("test")
    acc = accuracy(train_digits_mlp(seed=0), x, y)
    assert acc > 0.93
    assert acc == pytest.approx(accuracy(load_digits_mlp("plain"), x, y), abs=0.01)


def test_tensor_files(tmp_path):
    x = np.random.RandomState(0).randint(0, 256, size=(4, 1, 3, 3)).astype(np.uint8)
    y = np.array([0, 1, 2, 1])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    xa, ya = load_data(str(tmp_path / "d.npz"))
    assert xa.shape == (4, 1, 3, 3) and torch.allclose(xa, torch.from_numpy(x).float() / 255) and ya.tolist() == [0, 1, 2, 1]
    torch.save({"x": torch.rand(3, 5), "y": torch.tensor([1, 0, 1])}, tmp_path / "d.pt")
    torch.save((torch.rand(3, 5), torch.tensor([1, 0, 1])), tmp_path / "t.pt")
    assert load_data(str(tmp_path / "d.pt"), limit=2)[0].shape == (2, 5)
    assert tensor_file(tmp_path / "t.pt")[1].tolist() == [1, 0, 1]


def test_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    with pytest.raises(DataError, match="needs arrays x and y"):
        load_data(str(tmp_path / "bad.npz"))
    with pytest.raises(DataError, match="unknown split"):
        digits("validation")
    (tmp_path / "x.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(DataError, match="different lengths"):
        eran_csv(tmp_path / "x.csv")


def test_eran_csv_small(tmp_path):
    row = [3] + list(range(48))  # width 48: returned flat
    (tmp_path / "s.csv").write_text(",".join(map(str, row)) + "\n")
    x, y = eran_csv(tmp_path / "s.csv")
    assert x.shape == (1, 48) and y.tolist() == [3] and float(x[0, 47]) == pytest.approx(47 / 255)


def test_mnist_idx_and_eran_agree(shared_dir):
    d = shared_dir / "data"
    x, y = load_data(f"mnist:{d / 'mnist'}", limit=100)
    assert x.shape == (100, 1, 28, 28) and y[:5].tolist() == [7, 2, 1, 0, 4]
    assert mnist(d / "mnist" / "t10k-images-idx3-ubyte.gz", limit=3)[1].tolist() == [7, 2, 1]
    xe, ye = load_data(f"eran-mnist:{d / 'eran_samples' / 'mnist_test.csv'}")
    assert torch.equal(ye, y) and torch.equal(xe, x)  # the README: identical pixel for pixel


def test_eran_cifar_chw(shared_dir):
    path = shared_dir / "data" / "eran_samples" / "cifar10_test.csv"
    x, y = load_data(f"eran-cifar:{path}", limit=2)
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [3, 8]
    first = [float(v) / 255 for v in path.read_text().splitlines()[0].split(",")[1:4]]
    assert x[0, :, 0, 0].tolist() == pytest.approx(first)  # R, G, B of pixel (0, 0)
