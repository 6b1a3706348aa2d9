import json

import pytest

from clipcap_cache.data.annotations import read_annotations, select_split
from clipcap_cache.errors import ClipcapError


def write(path, text):
    path.write_text(text)
    return path


def test_coco_format_groups_captions_and_takes_split_from_file_name(tmp_path):
    data = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
        "annotations": [
            {"image_id": 9, "caption": " two "},
            {"image_id": 7, "caption": "one"},
            {"image_id": 9, "caption": "three"},
        ],
    }
    path = write(tmp_path / "captions_val2014.json", json.dumps(data))
    records = read_annotations(path)
    assert [(r.image_id, r.path, r.split, r.captions) for r in records] == [
        ("7", "a.jpg", "val", ["one"]),
        ("9", "b.jpg", "val", ["two", "three"]),
    ]


def test_karpathy_format_joins_folder_and_maps_restval_to_train(tmp_path):
    data = {
        "images": [
            {
                "filepath": "val2014",
                "filename": "x.jpg",
                "cocoid": 42,
                "split": "restval",
                "sentences": [{"raw": "A cat."}, {"raw": "A kitten."}],
            },
            {
                "filepath": "val2014",
                "filename": "y.jpg",
                "cocoid": 43,
                "split": "test",
                "sentences": [{"raw": "A dog."}],
            },
        ]
    }
    records = read_annotations(write(tmp_path / "dataset_coco.json", json.dumps(data)))
    assert [(r.image_id, r.path, r.split, r.captions) for r in records] == [
        ("42", "val2014/x.jpg", "train", ["A cat.", "A kitten."]),
        ("43", "val2014/y.jpg", "test", ["A dog."]),
    ]


def test_jsonl_and_csv_merge_rows_of_the_same_image(tmp_path):
    rows = [
        {"image": "p/1.png", "caption": "first", "split": "val"},
        {"image": "p/2.png", "caption": "other"},
        {"image": "p/1.png", "caption": "second", "split": "val"},
    ]
    jsonl = write(tmp_path / "data.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    csv = write(
        tmp_path / "data.csv",
        "image,caption,split\np/1.png,first,val\np/2.png,other,\np/1.png,second,val\n",
    )
    for path in (jsonl, csv):
        records = read_annotations(path)
        assert [(r.image_id, r.split, r.captions) for r in records] == [
            ("p/1.png", "val", ["first", "second"]),
            ("p/2.png", "train", ["other"]),
        ]
        assert [r.path for r in select_split(records, "val")] == ["p/1.png"]


@pytest.mark.bad_input("parsing")
@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.json", '{"images": [', "not valid JSON"),
        ("x.json", '{"images": [{"id": 1}], "annotations": []}', "has no 'file_name'"),
        (
            "x.json",
            '{"images": [{"id": 1, "file_name": "a"}], "annotations": [{"image_id": 2, "caption": "c"}]}',
            "not in 'images'",
        ),
        (
            "k.json",
            '{"images": [{"filename": "a", "split": "train", "sentences": [{}]}]}',
            "has no 'raw'",
        ),
        (
            "k.json",
            '{"images": [{"filename": "a", "split": "holdout", "sentences": []}]}',
            "unknown split",
        ),
        ("u.json", '{"foo": 1}', "unknown JSON annotation format"),
        ("u.csv", "path,text\na,b\n", "unknown annotation format"),
        ("e.jsonl", "", "empty"),
        ("l.jsonl", '{"image": "a", "caption": "b"}\n{broken\n', "JSON .line 2, column"),
    ],
)
def test_malformed_annotations_raise_a_clear_error(tmp_path, name, text, message):
    with pytest.raises(ClipcapError, match=message):
        read_annotations(write(tmp_path / name, text))


def test_explicit_format_is_respected(tmp_path):
    path = write(tmp_path / "data.txt", "image,caption\na.png,hello\n")
    assert read_annotations(path, "csv")[0].captions == ["hello"]
    with pytest.raises(ClipcapError, match="not valid JSON"):
        read_annotations(path, "coco")


@pytest.mark.bad_input("silent wrong result")
@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        # A second COCO image of one id replaced the first, whose captions went to the second.
        (
            "x.json",
            '{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], '
            '"annotations": [{"image_id": 1, "caption": "c"}]}',
            r"images\[1\] repeats image id 1",
        ),
        # Two Karpathy images of one cocoid became two cache rows that evaluation merged.
        (
            "k.json",
            '{"images": [{"filename": "a.jpg", "cocoid": 7, "split": "test", "sentences": []},'
            ' {"filename": "b.jpg", "cocoid": 7, "split": "test", "sentences": []}]}',
            r"image id '7' is given twice \(a.jpg and b.jpg\)",
        ),
        # A NUL was refused only when the cache was written, after every image was encoded.
        (
            "n.jsonl",
            '{"image": "a.jpg", "caption": "a red\\u0000 circle"}\n',
            "has a NUL character in its id, path or captions",
        ),
    ],
)
def test_what_the_cache_would_get_wrong_is_refused_on_reading(tmp_path, name, text, message):
    with pytest.raises(ClipcapError, match=message):
        read_annotations(write(tmp_path / name, text))
