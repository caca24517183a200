"""The merge's row decisions (`conversion.merge.MergedRows`) on hand-made rows, with the expected
statuses, `duplicate_of` and record positions written out by hand; and the merge streams: it never
holds more than one chunk's rows (so 500k files do not need ~1 GB of row dicts)."""

import weakref

from afm_jax.data.conversion import merge


class Row(dict):
    """A row dict that can be watched with a weak reference (plain dicts cannot)."""

    __slots__ = ("__weakref__",)


def _row(i, status="converted", uids=(), pixels="", patient="p1", label=1):
    images = [{"image_id": u, "patient_id": patient} for u in uids]
    return {
        "file_index": i,
        "file_id": f"f{i}",
        "status": status,
        "images": images,
        "pixel_hash": pixels,
        "label": label,
    }


ROWS = [
    _row(0, uids=("u0",), pixels="h0"),
    _row(1, uids=("u1", "u2"), pixels="h1", patient="p2", label=0),  # a two-frame file
    _row(2, uids=("u0",), pixels="h2"),  # the SOP UID of file 0 again
    _row(3, uids=("u3",), pixels="h1"),  # the pixels of file 1 again
    _row(4, status="failed:ValueError: bad header"),
    _row(5, status="skipped:not_an_image"),
    _row(6, uids=("u6",), pixels="h6", patient="p3"),
]


def test_duplicates_positions_and_summary_are_as_worked_out_by_hand():
    merged = merge.MergedRows(lambda: (dict(r) for r in ROWS), {"train": 1.0}, "stratified")
    assert merged.num_files == 7 and merged.num_images == 4  # files 0, 1 (2 frames), 6
    assert merged.split_of == {"p1": "train", "p2": "train", "p3": "train"}
    assert merged.summary == {
        "converted": 3,
        "failed:ValueError": 1,
        "skipped:duplicate_pixels": 1,
        "skipped:duplicate_sop_instance_uid": 1,
        "skipped:not_an_image": 1,
    }
    got = {r["file_index"]: (r["status"], r.get("duplicate_of", ""), r.get("output", "")) for r in merged.rows()}
    assert got == {
        0: ("converted", "", "train:0"),
        1: ("converted", "", "train:1;train:2"),
        2: ("skipped:duplicate_sop_instance_uid", "f0", ""),
        3: ("skipped:duplicate_pixels", "f1", ""),
        4: ("failed:ValueError: bad header", "", ""),
        5: ("skipped:not_an_image", "", ""),
        6: ("converted", "", "train:3"),
    }
    # rows() can be streamed again (the records pass, then the manifest pass): the same answer
    assert [r.get("output", "") for r in merged.rows()] == [got[i][2] for i in range(7)]


def test_the_merge_holds_one_row_at_a_time_not_all_rows(tmp_path):
    alive, most = set(), [0]

    def read():
        for i in range(2000):
            row = Row(_row(i, uids=(f"u{i}",), pixels=f"h{i % 1900}", patient=f"p{i % 50}", label=i % 2))
            alive.add(id(row))
            weakref.finalize(row, alive.discard, id(row))
            most[0] = max(most[0], len(alive))
            yield row

    merged = merge.MergedRows(read, {"train": 0.8, "test": 0.2}, "stratified")
    merge.write_manifest(merged.rows(), tmp_path / "manifest.csv")
    assert merged.summary["skipped:duplicate_pixels"] == 100
    assert most[0] <= 3, f"{most[0]} rows were held at once"
    assert len((tmp_path / "manifest.csv").read_text().splitlines()) == 2001
