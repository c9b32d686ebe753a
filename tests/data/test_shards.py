"""Fixed-length-record shards: exact round trip, class order, streaming dataset.

Streaming memory (flat in the data size) is measured by benchmarks/shards_memory.py.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
import pytest

from medflow.config import DataConfig
from medflow.data.shards import dataset, load_arrays, read_meta, write_shards

S, C = 16, 3


def make_inputs(tmp_path, n=30, labels=("b", "a", "c"), size=S, split_of=None):
    """Manifest whose ``row`` is a permutation (so row indexing is exercised), pixels, splits."""
    rng = np.random.default_rng(0)
    rows = rng.permutation(n)
    pixels = rng.integers(0, 256, (n, size, size, C), dtype=np.uint8)
    manifest = pd.DataFrame({"id": [f"img{i}.png" for i in range(n)],
                             "label": [labels[i % len(labels)] for i in range(n)], "row": rows})
    split_of = split_of or (lambda i: "train" if i % 5 < 3 else ("val" if i % 5 == 3 else "test"))
    splits = pd.DataFrame({"id": manifest["id"], "split": [split_of(i) for i in range(n)], "fold": -1})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    splits.to_csv(tmp_path / "splits.csv", index=False)
    np.save(tmp_path / "pixels.npy", pixels)
    return manifest, splits, pixels


def write(tmp_path, shard_size=4, data=DataConfig(), **kw):
    return write_shards(tmp_path / "manifest.csv", tmp_path / "pixels.npy", tmp_path / "splits.csv",
                        tmp_path / "processed", shard_size=shard_size, data=data, progress=False, **kw)


def test_round_trip_meta_and_class_order(tmp_path, capsys):
    manifest, splits, pixels = make_inputs(tmp_path)
    (tmp_path / "processed" / "stale").mkdir(parents=True)  # replaced as a whole
    summary = write(tmp_path)
    assert summary["counts"] == {"train": 18, "val": 6, "test": 6}
    assert summary["shards"] == {"train": 5, "val": 2, "test": 2}  # ceil(n / 4)
    assert sorted(p.name for p in (tmp_path / "processed").iterdir()) == ["meta.json", "test", "train", "val"]
    assert len(list((tmp_path / "processed" / "train").glob("shard-*.rec"))) == 5
    meta = read_meta(tmp_path / "processed")
    assert meta["classes"] == ["a", "b", "c"]  # sorted when data.labels is not given
    assert meta["image_size"] == S and meta["channels"] == C and meta["ordered"] is False
    assert meta["class_counts"]["val"] == {"a": 2, "b": 2, "c": 2}
    assert "shards: 30 images" in capsys.readouterr().err
    by_id = manifest.set_index("id")
    for split in ("train", "val", "test"):
        images, labels, ids = load_arrays(tmp_path / "processed", split)
        assert images.dtype == np.uint8 and images.shape == (meta["counts"][split], S, S, C)
        assert sorted(ids) == sorted(splits.loc[splits["split"] == split, "id"])
        for img, label, id_ in zip(images, labels, ids):
            np.testing.assert_array_equal(img, pixels[by_id.loc[id_, "row"]])
            assert meta["classes"][label] == by_id.loc[id_, "label"]

    write(tmp_path, data=DataConfig(labels=["c", "b", "a"]))
    assert read_meta(tmp_path / "processed")["classes"] == ["c", "b", "a"]
    _, labels, ids = load_arrays(tmp_path / "processed", "train")
    assert [["c", "b", "a"][k] for k in labels] == by_id.loc[ids, "label"].tolist()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_shard_bytes_do_not_depend_on_the_number_of_writer_threads(tmp_path):
    make_inputs(tmp_path, n=61)
    contents = []
    for workers in (1, 3):
        write(tmp_path, shard_size=4, workers=workers)
        root = tmp_path / "processed"
        contents.append({str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})
    assert len([k for k in contents[0] if k.endswith(".rec")]) == 16  # ceil(37/4) + ceil(12/4) + ceil(12/4)
    assert contents[0] == contents[1]


def test_shard_bytes_do_not_depend_on_the_write_block(tmp_path, monkeypatch):
    """Blocks smaller than a shard, and runs of consecutive rows read in several calls (the iovec limit),
    write the same bytes as whole-shard blocks, for scattered and for sequential manifest rows."""
    from medflow.data import shards

    manifest, _, _ = make_inputs(tmp_path, n=61)

    def contents():
        write(tmp_path, shard_size=8)
        root = tmp_path / "processed"
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for rows in (manifest["row"], np.arange(61)):  # a permutation, then one long run
        manifest.assign(row=rows).to_csv(tmp_path / "manifest.csv", index=False)
        whole = contents()
        with monkeypatch.context() as m:
            m.setattr(shards, "BLOCK_BYTES", 3 * (8 + S * S * C))  # 3 records per write
            m.setattr(shards, "IOV_MAX", 2)
            assert contents() == whole


def test_dataset_streams_batches_and_shuffles_deterministically(tmp_path):
    make_inputs(tmp_path)
    write(tmp_path)
    processed = tmp_path / "processed"
    ref_images, ref_labels, ref_ids = load_arrays(processed, "train")
    batches = list(dataset(processed, "train", batch_size=8, with_ids=True).as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [8, 8, 2]
    x, y, ids = (np.concatenate(p) for p in zip(*batches))
    assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape[1:] == (S, S, C)
    np.testing.assert_array_equal(x, ref_images.astype(np.float32))  # unshuffled: stored order
    np.testing.assert_array_equal(y, ref_labels)
    assert [i.decode() for i in ids] == ref_ids

    def order(seed, epochs=1):
        ds = dataset(processed, "train", batch_size=8, shuffle=True, seed=seed, with_ids=True)
        return [[i.decode() for b in ds.as_numpy_iterator() for i in b[2]] for _ in range(epochs)]

    first, second = order(1, epochs=2)
    assert sorted(first) == sorted(ref_ids) and first != ref_ids
    assert first != second  # reshuffled each epoch
    assert order(1, epochs=2) == [first, second]  # same seed, same sequence
    assert order(2)[0] != first

    two = list(dataset(processed, "train", batch_size=4).take(1).as_numpy_iterator())[0]
    assert len(two) == 2 and two[0].shape == (4, S, S, C)
    raw = np.concatenate([b[0] for b in dataset(processed, "train", batch_size=8, dtype="uint8").as_numpy_iterator()])
    assert raw.dtype == np.uint8 and np.array_equal(raw, ref_images)  # the training input's 8-bit read


def test_empty_split_and_input_errors(tmp_path):
    _, splits, _ = make_inputs(tmp_path, n=10, split_of=lambda i: "train" if i < 7 else "test")
    summary = write(tmp_path)
    assert summary["counts"]["val"] == 0 and summary["shards"]["val"] == 0
    images, labels, ids = load_arrays(tmp_path / "processed", "val")
    assert images.shape == (0, S, S, C) and labels.shape == (0,) and ids == []
    assert list(dataset(tmp_path / "processed", "val", batch_size=4).as_numpy_iterator()) == []
    with pytest.raises(ValueError, match="split must be one of"):
        dataset(tmp_path / "processed", "holdout", batch_size=4)

    with pytest.raises(ValueError, match=r"not in data.labels"):
        write(tmp_path, data=DataConfig(labels=["a", "b"]))
    pd.concat([splits, splits.iloc[:1]]).to_csv(tmp_path / "splits.csv", index=False)
    with pytest.raises(ValueError, match=r"ids repeat, e.g. \['img0.png'\]"):
        write(tmp_path)
    splits.iloc[:8].to_csv(tmp_path / "splits.csv", index=False)
    with pytest.raises(ValueError, match="2 manifest ids have no split"):
        write(tmp_path)
    assert json.loads((tmp_path / "processed" / "meta.json").read_text())["counts"]["train"] == 7  # untouched



def test_excluded_rows_are_written_to_no_split_and_reported(tmp_path, capsys):
    """``excluded`` (extra rows linked to val/test rows) reach no split; an unknown split value stops."""
    _, splits, _ = make_inputs(tmp_path, n=10, split_of=lambda i: ("train", "val", "test", "excluded")[i % 4])
    summary = write(tmp_path)
    assert summary["counts"] == {"train": 3, "val": 3, "test": 2} and summary["excluded"] == 2
    written = [i for split in ("train", "val", "test") for i in load_arrays(tmp_path / "processed", split)[2]]
    assert sorted(written) == sorted(splits.loc[splits["split"] != "excluded", "id"])
    assert "2 excluded (split 'excluded')" in capsys.readouterr().err
    splits.assign(split=["holdout"] + splits["split"].tolist()[1:]).to_csv(tmp_path / "splits.csv", index=False)
    with pytest.raises(ValueError, match=r"unknown split values \['holdout'\]"):
        write(tmp_path)
