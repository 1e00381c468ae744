import numpy as np
import pytest
import torch

from pyro_vae.data import DataError, check_data, check_labels, from_arrays, load_dataset

from idx import write_mnist


def test_digits_is_the_embedded_default():
    d = load_dataset()
    assert d.name == "digits" and d.input_shape == (1, 8, 8) and d.num_classes == 10
    n = d.x_train.shape[0] + d.x_val.shape[0] + d.x_test.shape[0]
    assert n == 1797
    for x in (d.x_train, d.x_val, d.x_test):
        assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    # the test split does not depend on the run's seed; the validation split does
    other = load_dataset(seed=1)
    assert torch.equal(d.x_test, other.x_test) and not torch.equal(d.x_val, other.x_val)
    assert torch.equal(d.x_val, load_dataset(seed=0).x_val)


def test_mnist_from_idx_files_written_here(tmp_path):
    write_mnist(tmp_path, n_train=100, n_test=30)
    d = load_dataset("mnist", tmp_path, val_fraction=0.1)
    assert d.input_shape == (1, 28, 28)
    assert (d.x_train.shape[0], d.x_val.shape[0], d.x_test.shape[0]) == (90, 10, 30)
    assert d.x_train.max() <= 1 and d.y_test.dtype == torch.long


def test_fashion_and_kmnist_use_their_own_folders(tmp_path):
    write_mnist(tmp_path, folder="FashionMNIST", n_train=20, n_test=5)
    assert load_dataset("fashion-mnist", tmp_path).x_test.shape == (5, 1, 28, 28)
    with pytest.raises(DataError, match="KMNIST files not found: put .* in .*KMNIST/raw"):
        load_dataset("kmnist", tmp_path)


def test_missing_mnist_files_say_where_to_put_them(tmp_path):
    with pytest.raises(DataError, match=r"MNIST files not found: put train-images-idx3-ubyte.gz.*MNIST/raw"):
        load_dataset("mnist", tmp_path / "nowhere")


def test_missing_cifar_files_are_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 files not found"):
        load_dataset("cifar10", tmp_path)


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    raw = write_mnist(tmp_path, n_train=10, n_test=5)
    f = raw / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DataError, match=f"could not read MNIST: {f} is corrupt or truncated "
                                        r"\(10x28x28 values need 7856 bytes, the file has 100\)"):
        load_dataset("mnist", tmp_path)


def test_data_to_binarize_must_be_probabilities():
    from pyro_vae.data import needs_binarization
    from pyro_vae.likelihoods import Bernoulli, Gaussian
    lik = Bernoulli((4,))
    assert needs_binarization(lik, torch.rand(3, 4)) and not needs_binarization(lik, torch.ones(3, 4))
    with pytest.raises(DataError, match=r"needs values in \[0, 1\]; got values in \[-1, 2\]"):
        needs_binarization(lik, torch.tensor([[-1.0, 2.0]]))
    with pytest.raises(DataError, match="applies to binary likelihoods"):
        needs_binarization(Gaussian((4,)), torch.rand(3, 4), "dynamic")
    assert not needs_binarization(Gaussian((4,)), torch.rand(3, 4) * 5, "auto")


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")


@pytest.mark.mnist
def test_real_mnist_from_the_official_gz_files(mnist_dir):
    d = load_dataset("mnist", mnist_dir, val_fraction=0.1)
    assert d.x_train.shape == (54000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.y_test.bincount().tolist()[:3] == [980, 1135, 1032]  # the official test-set class counts


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.full((3, 4), float("nan")), "NaN or infinite values"),
        (torch.tensor([[0.0, float("inf")]]), "NaN or infinite"),
        (torch.zeros(0, 4), "empty"),
        (torch.zeros(4), "batch dimension"),
        (np.array([["a", "b"]]), "numeric"),
        ("not data", "tensor, a numpy array"),
        (torch.zeros(2, 2, dtype=torch.bool), "real-valued"),
    ],
)
def test_check_data_errors(x, message):
    with pytest.raises(DataError, match=message):
        check_data(x)


def test_check_data_shape_and_numpy():
    x = check_data(np.random.rand(5, 64), input_shape=(1, 8, 8))
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float64  # kept; fit casts to the model's dtype
    assert check_data(np.ones((5, 64), dtype=np.uint8), input_shape=(1, 8, 8)).dtype == torch.float32
    with pytest.raises(DataError, match=r"expected data of shape \(batch, 1, 8, 8\)"):
        check_data(np.random.rand(5, 65), input_shape=(1, 8, 8))


def test_labels():
    assert check_labels([0, 2, 1], 3, 3).tolist() == [0, 2, 1]
    with pytest.raises(DataError, match="out of range"):
        check_labels([0, 5], 2, num_classes=3)
    with pytest.raises(DataError, match="non-negative"):
        check_labels([-1, 0], 2)
    with pytest.raises(DataError, match="vector of 3"):
        check_labels([0, 1], 3)


def test_from_arrays_and_single_example():
    d = from_arrays(np.random.rand(20, 1, 4, 4), np.arange(20) % 3)
    assert d.x_train.shape[0] == 18 and d.num_classes == 3
    with pytest.raises(DataError, match="too small"):
        from_arrays(np.random.rand(1, 4))
