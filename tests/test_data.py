"""models.data: real data, deterministic calib/eval splits that never overlap, clear errors.

Needs the set-up step `python -m models.data fetch` (gensim's test data in carve's cache).
"""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest

from models import data, data_fetch, data_images, data_text
from models.data_split import DataError, split_indices, split_stratified
from runtime.errors import CarveError, ModelLoadError

SIZE = 32  # small images keep the tests fast; the crops and splits do not depend on size


def _digests(x: np.ndarray) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(item).tobytes()).hexdigest() for item in x}


@pytest.mark.parametrize("source", ["news", "polarity", "shakespeare"])
def test_text_splits_are_disjoint_deterministic_and_nonempty(source):
    calib, evals = data.texts(source, "calib"), data.texts(source, "eval")
    assert calib and evals
    assert not set(calib) & set(evals)
    assert data.texts(source, "calib") == calib
    assert all(isinstance(t, str) and t.strip() for t in calib + evals)


def test_news_covers_every_distinct_article_once():
    calib, evals = data.texts("news", "calib"), data.texts("news", "eval")
    assert len(calib) + len(evals) == len(set(calib + evals)) == 293
    assert len(calib) == 98


def test_shakespeare_assigns_whole_plays_to_one_split():
    files = data_text.play_files()
    assert len(files) == 37
    names = [f.name for f in files]
    calib = set(split_indices(names, "calib", data_text.CALIB_FRACTION))
    evals = set(split_indices(names, "eval", data_text.CALIB_FRACTION))
    assert not calib & evals and len(calib | evals) == len(files)
    # A passage of a calibration play never shows up in the evaluation texts.
    hamlet_like = data_text.passages(files[sorted(calib)[0]].read_text())
    assert not set(hamlet_like) & set(data.texts("shakespeare", "eval"))
    assert min(len(t) for t in data.texts("shakespeare", "eval")) >= data_text.MIN_TAIL_CHARS


def test_texts_n_takes_a_fixed_prefix():
    assert data.texts("shakespeare", "eval", n=5) == data.texts("shakespeare", "eval")[:5]
    assert data.texts("news", "calib", n=0) == []
    with pytest.raises(DataError):
        data.texts("news", "calib", n=-1)


def test_polarity_labels_balanced_and_aligned_with_texts():
    for split in data.SPLITS:
        sentences, labels = data.polarity(split)
        assert labels.dtype == np.int64 and set(labels.tolist()) == {0, 1}
        assert len(sentences) == len(labels) == 100 and labels.sum() == 50
        assert sentences == data.texts("polarity", split)
        assert not any(s.startswith("__label__") for s in sentences)
    calib, _ = data.polarity("calib")
    evals, _ = data.polarity("eval")
    assert not set(calib) & set(evals)


def test_polarity_decodes_windows_1252():
    sentences = data.texts("polarity", "calib") + data.texts("polarity", "eval")
    assert any("clichés" in s for s in sentences)
    assert not any("\ufffd" in s for s in sentences)


@pytest.mark.parametrize("source,split", [("tweets", "calib"), ("news", "train")])
def test_unknown_source_or_split_is_a_carve_error(source, split):
    with pytest.raises(CarveError, match="use one of"):
        data.texts(source, split)


def test_stratified_split_keeps_balance():
    keys = [f"k{i}" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    calib = split_stratified(keys, labels, "calib", 0.5)
    evals = split_stratified(keys, labels, "eval", 0.5)
    assert sorted(calib + evals) == list(range(40))
    assert sum(labels[i] for i in calib) == 10 and len(calib) == 20


def test_images_shape_normalisation_and_disjoint_splits():
    calib, evals = data.images("calib", SIZE), data.images("eval", SIZE)
    assert calib.shape == (35, 3, SIZE, SIZE) and evals.shape == (65, 3, SIZE, SIZE)
    assert calib.dtype == np.float32
    pixels = calib.transpose(0, 2, 3, 1) * data_images.STD + data_images.MEAN
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
    assert not _digests(calib) & _digests(evals)
    assert np.array_equal(data.images("calib", SIZE), calib)
    names = data_images.SOURCES
    frac = data_images.CALIB_FRACTION
    assert not set(split_indices(names, "calib", frac)) & set(split_indices(names, "eval", frac))


def test_images_default_size_and_n():
    x = data.images("calib", n=2)
    assert x.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(x, data.images("calib")[:2])
    x[:] = 0  # callers get a copy: the cached array is unchanged
    assert data.images("calib", n=1).any()
    with pytest.raises(DataError):
        data.images("calib", size=2)


def test_faces_labels_and_disjoint_splits():
    xc, yc = data.faces("calib", SIZE)
    xe, ye = data.faces("eval", SIZE)
    assert xc.shape == (100, 3, SIZE, SIZE) and ye.shape == (100,)
    assert yc.sum() == ye.sum() == 50
    assert not _digests(xc) & _digests(xe)
    xc2, yc2 = data.faces("calib", SIZE)
    assert np.array_equal(xc, xc2) and np.array_equal(yc, yc2)


def test_frame_stream_moves_one_object_over_a_still_background():
    frames, masks = data.frame_stream(12, SIZE * 2, seed=1)
    assert frames.shape == (12, 3, SIZE * 2, SIZE * 2) and frames.dtype == np.float32
    assert masks.shape == (12, SIZE * 2, SIZE * 2) and masks.dtype == bool
    side = SIZE * 2 // 4
    assert (masks.sum(axis=(1, 2)) == side * side).all()
    for t in range(1, len(frames)):
        still = ~(masks[t] | masks[t - 1])
        assert np.array_equal(frames[t][:, still], frames[t - 1][:, still])
        assert not np.array_equal(masks[t], masks[t - 1])
    assert not np.array_equal(frames[0][:, masks[0]], frames[1][:, masks[0]])
    again, _ = data.frame_stream(12, SIZE * 2, seed=1)
    other, _ = data.frame_stream(12, SIZE * 2, seed=2)
    assert np.array_equal(frames, again) and not np.array_equal(frames, other)
    with pytest.raises(DataError):
        data.frame_stream(0, SIZE)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CARVE_CACHE", str(tmp_path))
    data_text.news_all.cache_clear()
    data_text.polarity_all.cache_clear()
    yield tmp_path / "data"
    data_text.news_all.cache_clear()
    data_text.polarity_all.cache_clear()


def test_missing_data_names_the_fetch_command(empty_cache):
    with pytest.raises(ModelLoadError, match=r"python -m models\.data fetch"):
        data.texts("news", "eval")
    with pytest.raises(ModelLoadError, match=r"python -m models\.data fetch"):
        data.polarity("eval")


def test_corrupt_data_file_is_reported(empty_cache):
    empty_cache.mkdir(parents=True, exist_ok=True)
    (empty_cache / "lee_background.cor").write_text("not the corpus\n")
    with pytest.raises(ModelLoadError, match="corrupt"):
        data.texts("news", "eval")


def _wheel_from_cache(path, names):
    blobs = {n: data_fetch.read_cached(n) for n in names}
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in blobs.items():
            z.writestr(data_fetch.MEMBER_DIR + name, blob)
    return path


def test_fetch_from_a_wheel_file(tmp_path, monkeypatch):
    wheel = _wheel_from_cache(tmp_path / "gensim.whl", data_fetch.FILES)
    monkeypatch.setenv("CARVE_CACHE", str(tmp_path / "cache"))
    assert data_fetch.missing() == list(data_fetch.FILES)
    assert data.main(["fetch", "--wheel", str(wheel)]) == 0
    assert data_fetch.missing() == []
    assert data.main(["fetch"]) == 0  # already present: nothing is downloaded


def test_fetch_rejects_a_wheel_without_the_files(tmp_path, monkeypatch, capsys):
    wheel = _wheel_from_cache(tmp_path / "partial.whl", ["pang_lee_polarity.cor"])
    monkeypatch.setenv("CARVE_CACHE", str(tmp_path / "cache"))
    assert data.main(["fetch", "--wheel", str(wheel)]) == ModelLoadError.exit_code
    assert "gensim" in capsys.readouterr().err
    assert data_fetch.missing() == list(data_fetch.FILES)
