"""Split: stratified, grouped (patients and exact duplicates never cross splits), official splits."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medflow.config import DataConfig, SplitConfig
from medflow.data.manifest import EXCLUDED, EXTRA, SPLITS
from medflow.data.split import SplitError, assign_splits, components, count_table, read_manifest, run_split

MALARIA = Path(__file__).resolve().parents[2] / "data" / "raw" / "malaria-cells-400"


def frame(labels, groups, hashes, source=None) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame({"id": [f"img{i}.png" for i in range(n)], "label": labels, "group": groups,
                         "pixel_hash": hashes, "source_split": source if source is not None else [""] * n})


def assert_no_leak(df: pd.DataFrame, out: pd.DataFrame, column: str = "split") -> None:
    for key in ("group", "pixel_hash"):
        mask = df[key].fillna("") != ""
        spread = out.loc[mask.to_numpy(), column].groupby(df.loc[mask, key].to_numpy()).nunique()
        assert (spread <= 1).all(), f"{key} values crossing {column}s: {spread[spread > 1].index.tolist()}"


rows = st.integers(1, 60).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from(["a", "b", "c"]), min_size=n, max_size=n),
    st.lists(st.sampled_from(["", "g1", "g2", "g3", "g4", "g5", "g6", "g7"]), min_size=n, max_size=n),
    st.lists(st.sampled_from(["", "h1", "h2", "h3"]) | st.uuids().map(str), min_size=n, max_size=n),
    st.lists(st.sampled_from(["", "", "train", "val", "test"]), min_size=n, max_size=n),
))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=rows, seed=st.integers(0, 2**16), respect=st.booleans())
def test_no_group_or_duplicate_crosses_splits(data, seed, respect):
    df = frame(*data)
    cfg = SplitConfig(seed=seed, respect_source_split=respect)
    out = assign_splits(df, cfg)
    assert list(out.columns) == ["id", "split", "fold"]
    assert out["id"].tolist() == df["id"].tolist()  # every row exactly once, same order
    assert out["split"].isin(SPLITS).all()
    assert (out["fold"] == -1).all()
    assert_no_leak(df, out)
    pd.testing.assert_frame_equal(out, assign_splits(df, cfg))  # deterministic for a seed


@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
@settings(max_examples=30, deadline=None)
@given(data=rows, seed=st.integers(0, 2**16))
def test_folds_are_grouped_and_cover_every_row(data, seed):
    df = frame(*data)
    cfg = SplitConfig(seed=seed, folds=3)
    if components(df).max() + 1 < 3 or (df["label"].value_counts() < 3).all():
        with pytest.raises(ValueError, match="split.folds=3"):
            assign_splits(df, cfg)
        return
    out = assign_splits(df, cfg)
    assert set(out["fold"]) == {0, 1, 2}
    assert_no_leak(df, out, "fold")


def test_components_merge_groups_through_duplicates():
    df = frame(["a", "b", "a", "b", "a"], ["p1", "p2", "p3", "", ""], ["h1", "h1", "h2", "h2", "h9"])
    comp = components(df)
    # p1 and p2 share h1; p3 and the ungrouped row share h2; the last row stands alone
    assert comp[0] == comp[1] and comp[2] == comp[3]
    assert len({comp[0], comp[2], comp[4]}) == 3


def malaria_frame() -> pd.DataFrame:
    assert MALARIA.is_dir(), f"embedded malaria sample missing at {MALARIA} (shipped in the repository)"
    pattern = re.compile(DataConfig().group_pattern)
    rows = []
    for p in sorted(MALARIA.glob("*/*.png")):
        m = pattern.match(p.stem)
        rows.append({"id": f"{p.parent.name}/{p.name}", "label": p.parent.name,
                     "group": m.group("group") if m else "",
                     "pixel_hash": hashlib.sha256(p.read_bytes()).hexdigest(), "source_split": ""})
    return pd.DataFrame(rows)


def test_malaria_ratios_and_slides_respected():
    df = malaria_frame()
    assert len(df) == 400 and df["group"].nunique() == 148
    out = assign_splits(df, SplitConfig(folds=5))
    assert_no_leak(df, out)
    assert_no_leak(df, out, "fold")
    table = pd.crosstab(df["label"], out["split"])
    target = {"train": 0.6, "val": 0.1, "test": 0.3}
    for label in ("Parasitized", "Uninfected"):
        for split, r in target.items():
            assert abs(table.loc[label, split] / 200 - r) <= 0.03, (label, split, table)
    sizes = out["fold"].value_counts(normalize=True)
    assert sorted(sizes.index) == [0, 1, 2, 3, 4]
    assert ((sizes - 0.2).abs() <= 0.05).all(), sizes
    other = assign_splits(df, SplitConfig(seed=7))
    assert (other["split"] != out["split"]).any()  # the seed matters


def test_official_splits_kept_and_duplicates_moved_to_the_held_out_side():
    df = frame(["a", "b"] * 6, [f"p{i}" for i in range(12)], [f"h{i}" for i in range(11)] + ["h0"],
               ["train"] * 6 + ["val"] * 2 + ["test"] * 4)
    out = assign_splits(df, SplitConfig())
    expected = df["source_split"].copy()
    expected[0] = "test"  # h0 is in official train and official test: the train copy goes to test
    assert out["split"].tolist() == expected.tolist()
    ignored = assign_splits(df, SplitConfig(respect_source_split=False))
    assert_no_leak(df, ignored)


def test_rows_moved_off_their_official_split_are_counted_and_warned_about(tmp_path, capsys):
    df = frame(["a", "b"] * 6, [f"p{i}" for i in range(12)], [f"h{i}" for i in range(11)] + ["h0"],
               ["train"] * 6 + ["val"] * 2 + ["test"] * 4)
    df.to_csv(tmp_path / "manifest.csv", index=False)
    summary = run_split(tmp_path / "manifest.csv", tmp_path / "splits.csv", tmp_path / "c.csv", SplitConfig())
    assert summary["moved_from_source_split"] == 1  # h0's train copy joined its duplicate in test
    assert "split: WARNING 1 of 12 rows (8%) moved off the source's official split" in capsys.readouterr().err


def test_val_is_carved_from_official_train_when_source_has_none():
    n = 40
    df = frame(["a", "b"] * (n // 2), [f"p{i}" for i in range(n)], [f"h{i}" for i in range(n)],
               ["train"] * 30 + ["test"] * 10)
    out = assign_splits(df, SplitConfig(train=0.6, val=0.1, test=0.3))
    assert (out["split"][30:] == "test").all()
    head = out["split"][:30].value_counts()
    assert set(head.index) == {"train", "val"}
    assert abs(head["val"] / 30 - 0.1 / 0.7) < 0.05


def test_run_split_writes_splits_and_counts(tmp_path, capsys):
    n = 50
    df = frame(["0", "1"] * (n // 2), [f"p{i // 2}" for i in range(n)], [f"h{i}" for i in range(n)])
    df.to_csv(tmp_path / "manifest.csv", index=False)
    summary = run_split(tmp_path / "manifest.csv", tmp_path / "splits.csv", tmp_path / "reports" / "c.csv",
                        SplitConfig(folds=5))
    assert summary["rows"] == n and summary["components"] == 25
    assert sum(summary["counts"].values()) == n and summary["source_split_used"] is False
    splits = pd.read_csv(tmp_path / "splits.csv", dtype={"id": str})
    assert splits["id"].tolist() == df["id"].tolist()
    assert splits["fold"].between(0, 4).all()
    counts = pd.read_csv(tmp_path / "reports" / "c.csv", dtype={"label": str}).set_index("label")
    assert list(counts.columns) == ["train", "val", "test", "total"]
    assert counts.index.tolist() == ["0", "1", "total"]  # numeric-looking labels stay text
    assert counts.loc["total", "total"] == n
    assert counts.loc["0", "total"] == n // 2
    assert counts.loc["total", "train"] == summary["counts"]["train"]
    assert "split: 50 rows in 25 independent groups" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files
    assert read_manifest(tmp_path / "manifest.csv")["label"].tolist()[:2] == ["0", "1"]


def test_extra_train_data_leaves_the_test_set_unchanged():
    """Retraining adds labelled batches as ``extra`` rows: the held-out test set must not move."""
    base = malaria_frame()
    extra = base.head(30).assign(id=lambda d: "extra/b1/" + d["id"], group=lambda d: "new-" + d["group"],
                                 pixel_hash=lambda d: "x" + d["pixel_hash"], source_split=EXTRA)
    before = assign_splits(base, SplitConfig())
    after = assign_splits(pd.concat([base, extra], ignore_index=True), SplitConfig())
    test_before = set(before.loc[before["split"] == "test", "id"])
    test_after = set(after.loc[after["split"] == "test", "id"])
    assert test_before == test_after and test_before
    assert set(after.loc[after["id"].str.startswith("extra/"), "split"]) == {"train"}


def test_extra_rows_of_known_slides_never_move_val_or_test():
    """New cells from slides already split (same group) or duplicates of split images (same pixels) go
    to train when their slide is in train, else to ``excluded``; every source row keeps its split."""
    base = malaria_frame()
    before = assign_splits(base, SplitConfig())
    where = dict(zip(base["group"], before["split"]))
    slides = {s: next(g for g, v in where.items() if v == s) for s in SPLITS}  # one slide of each split
    dup = base.loc[before["split"] == "val"].iloc[0]  # a duplicate of a val image on a new slide
    extra = pd.DataFrame({"id": ["extra/b1/t.png", "extra/b1/v.png", "extra/b1/s.png", "extra/b1/d.png",
                                 "extra/b1/n.png"],
                          "label": ["Parasitized"] * 5,
                          "group": [slides["train"], slides["val"], slides["test"], "new-slide", "other-slide"],
                          "pixel_hash": ["e1", "e2", "e3", dup["pixel_hash"], "e5"], "source_split": EXTRA})
    out = assign_splits(pd.concat([base, extra], ignore_index=True), SplitConfig())
    assert out["split"][:len(base)].tolist() == before["split"].tolist()  # not one source row moved
    assert out["split"][len(base):].tolist() == ["train", EXCLUDED, EXCLUDED, EXCLUDED, "train"]


extra_rows = st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from(["a", "b"]), min_size=n, max_size=n),
    st.lists(st.sampled_from(["", "g1", "g2", "g3", "g4", "g5"]), min_size=n, max_size=n),
    st.lists(st.sampled_from(["", "h1", "h2"]) | st.uuids().map(str), min_size=n, max_size=n),
    st.lists(st.sampled_from(["", "", "train", "test", EXTRA, EXTRA]), min_size=n, max_size=n),
))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=extra_rows, seed=st.integers(0, 2**16))
def test_extra_rows_never_change_the_other_rows_splits(data, seed):
    df = frame(*data)
    cfg = SplitConfig(seed=seed)
    out = assign_splits(df, cfg)
    extra = (df["source_split"] == EXTRA).to_numpy()
    alone = assign_splits(df[~extra], cfg)
    assert out["split"][~extra].tolist() == alone["split"].tolist()  # as if the extra rows did not exist
    assert set(out["split"][extra]) <= {"train", EXCLUDED}
    kept = (out["split"] != EXCLUDED).to_numpy()
    assert_no_leak(df[kept].reset_index(drop=True), out[kept].reset_index(drop=True))
    comp = components(df)  # an extra row is excluded exactly when it is linked to a val/test row
    held = set(comp[~extra & (out["split"] != "train").to_numpy()])
    assert [c in held for c in comp[extra]] == (out["split"][extra] == EXCLUDED).tolist()


def test_test_split_is_carved_when_the_source_has_none():
    """A tree with only train/ (and val/) folders still gets a test split, carved from its train part."""
    n = 60
    labels, groups, hashes = ["a", "b"] * (n // 2), [f"p{i // 2}" for i in range(n)], [f"h{i}" for i in range(n)]
    out = assign_splits(frame(labels, groups, hashes, ["train"] * 50 + ["val"] * 10), SplitConfig())
    assert (out["split"][50:] == "val").all()
    head = out["split"][:50].value_counts()
    assert set(head.index) == {"train", "test"} and abs(head["test"] / 50 - 0.3 / 0.9) < 0.07
    only_train = assign_splits(frame(labels, groups, hashes, ["train"] * n), SplitConfig())
    counts = only_train["split"].value_counts()
    assert set(counts.index) == set(SPLITS) and abs(counts["test"] / n - 0.3) < 0.07
    assert_no_leak(frame(labels, groups, hashes), only_train)


def test_run_split_stops_on_an_empty_split_and_reports_excluded_rows(tmp_path, capsys):
    df = frame(["a", "b"], ["p1", "p2"], ["h1", "h2"])
    df.to_csv(tmp_path / "tiny.csv", index=False)
    with pytest.raises(SplitError, match=r"no rows in (val|test).*2 independent groups"):
        run_split(tmp_path / "tiny.csv", tmp_path / "s.csv", tmp_path / "c.csv", SplitConfig())
    assert not (tmp_path / "s.csv").exists()

    base = malaria_frame()
    before = assign_splits(base, SplitConfig())
    test_slide = base["group"][(before["split"] == "test").to_numpy()].iloc[0]
    extra = pd.DataFrame({"id": ["extra/b/x.png", "extra/b/y.png"], "label": ["Uninfected"] * 2,
                          "group": [test_slide, "brand-new"], "pixel_hash": ["e1", "e2"], "source_split": EXTRA})
    pd.concat([base, extra], ignore_index=True).to_csv(tmp_path / "manifest.csv", index=False)
    summary = run_split(tmp_path / "manifest.csv", tmp_path / "splits.csv", tmp_path / "counts.csv", SplitConfig())
    assert summary["extra_rows"] == 2 and summary["excluded"] == 1 and summary["moved_from_source_split"] == 0
    assert summary["rows"] == 402 and sum(summary["counts"].values()) == 401
    counts = pd.read_csv(tmp_path / "counts.csv").set_index("label")
    assert list(counts.columns) == ["train", "val", "test", EXCLUDED, "total"]
    assert counts.loc["Uninfected", EXCLUDED] == 1 and counts.loc["total", "total"] == 402
    assert "1 of 2 extra rows share a patient/slide or pixels with val/test rows" in capsys.readouterr().err
    assert list(count_table(pd.Series(["a"]), pd.Series(["train"])).columns) == ["train", "val", "test", "total"]


def test_a_class_with_no_training_rows_stops_the_split(tmp_path, capsys):
    """A class only in the official test split (e.g. test/rare/ with no train/rare/) can never be learnt."""
    n = 40
    df = frame(["a", "b"] * (n // 2) + ["rare"] * 3, [f"p{i}" for i in range(n + 3)],
               [f"h{i}" for i in range(n + 3)], ["train"] * 30 + ["test"] * 10 + ["test"] * 3)
    df.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(SplitError, match=r"class 'rare' has no training images \(train 0, val 0, test 3\): the "
                                         r"model could never learn it.*split.respect_source_split: false"):
        run_split(tmp_path / "manifest.csv", tmp_path / "s.csv", tmp_path / "c.csv", SplitConfig())
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "c.csv").exists()
    # re-split: the rare class gets training rows
    summary = run_split(tmp_path / "manifest.csv", tmp_path / "s.csv", tmp_path / "c.csv",
                        SplitConfig(respect_source_split=False))
    assert summary["rows"] == n + 3
    counts = pd.read_csv(tmp_path / "c.csv").set_index("label")
    assert counts.loc["rare", "train"] > 0
    err = capsys.readouterr().err
    assert "split: WARNING class 'rare' has no val images" in err  # 3 rows cannot fill all three splits
    assert "class 'a'" not in err and "class 'b'" not in err


def test_a_class_with_no_validation_rows_is_warned_about(tmp_path, capsys):
    n = 60
    df = frame(["a", "b"] * (n // 2) + ["c"] * 8, [f"p{i}" for i in range(n + 8)], [f"h{i}" for i in range(n + 8)],
               ["train"] * 40 + ["val"] * 6 + ["test"] * 14 + ["train"] * 6 + ["test"] * 2)
    df.to_csv(tmp_path / "manifest.csv", index=False)
    run_split(tmp_path / "manifest.csv", tmp_path / "s.csv", tmp_path / "c.csv", SplitConfig())
    err = capsys.readouterr().err
    assert ("split: WARNING class 'c' has no val images (train 6, val 0, test 2): validation loss, early stopping "
            "and the kept epoch ignore it. To fix: move some of its images (whole patients/slides) into val/") in err
    assert "class 'a'" not in err and "class 'b'" not in err
    assert (tmp_path / "s.csv").exists()


def test_split_errors_are_user_errors():
    """What `medflow split` prints as one `error: ...` line (and a flow never retries)."""
    from medflow.cli import _user_errors
    from medflow.data.sources import SourceError

    assert issubclass(SplitError, SourceError) and issubclass(SplitError, _user_errors())
    with pytest.raises(SplitError, match="split.folds=5 needs at least that many independent groups"):
        assign_splits(frame(["a", "b"], ["p1", "p2"], ["h1", "h2"]), SplitConfig(folds=5))
