"""The CIFAR loader only builds arrays whose bytes are in the file: a tiny pickle that
asks numpy for a huge uninitialised array (using only the allowed names) is refused
before any memory is taken; a batch file with too many images is refused."""
import io
import pickle
import resource

import numpy as np
import pytest

import mpi_examples.data as D


class HugeArray:
    """Pickles as numpy's _reconstruct called with a huge shape and no data."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct
        return (_reconstruct, (np.ndarray, (1_830_000, 3072), b"B"))


def test_memory_bomb_is_refused_and_rss_stays_small(tmp_path):
    bomb = tmp_path / "data_batch_1"
    bomb.write_bytes(pickle.dumps({b"data": HugeArray(), b"labels": [0]}, protocol=2))
    assert bomb.stat().st_size < 400
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(D.UnsafePickleError, match="no data behind it"):
        D.safe_load_pickle(bomb)
    with pytest.raises(D.DataError, match="no data behind it"):
        D.load_cifar_batch(bomb, "labels")
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew_kib < 100_000, f"max RSS grew by {grew_kib} KiB"


def test_real_arrays_still_load():
    x = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    payload = pickle.dumps({b"data": x, b"labels": [1, 2]}, protocol=2)
    d = D.CifarUnpickler(io.BytesIO(payload), encoding="bytes").load()
    np.testing.assert_array_equal(d[b"data"], x)


def test_too_many_images_per_file(tmp_path):
    n = D.MAX_IMAGES_PER_FILE + 1
    f = tmp_path / "data_batch_1"
    f.write_bytes(pickle.dumps({b"data": np.zeros((n, 3072), np.uint8), b"labels": [0] * n},
                               protocol=4))
    with pytest.raises(D.DataError, match="images in one batch file"):
        D.load_cifar_batch(f, "labels")
