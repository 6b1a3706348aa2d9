"""Training data mapped from disk: the feature cache and the tokenized captions beside it."""

import shutil

import numpy as np
import pytest

from clipcap_cache.data.cache import open_cache, read_cache, write_cache
from clipcap_cache.data.tokens import load_token_table, tokenize
from clipcap_cache.errors import ClipcapError
from clipcap_cache.model import load_tokenizer


def test_open_cache_maps_what_read_cache_reads(shapes_cache):
    mapped, whole = open_cache(shapes_cache), read_cache(shapes_cache)
    # Mapped, not read: the operating system shares these pages between processes.
    assert isinstance(mapped.embeddings, np.memmap)
    assert isinstance(mapped.caption_image_index, np.memmap)
    np.testing.assert_array_equal(mapped.embeddings, whole.embeddings)
    np.testing.assert_array_equal(mapped.caption_image_index, whole.caption_image_index)
    np.testing.assert_array_equal(mapped.splits, whole.splits)
    rows = whole.rows_of_split("val")[[5, 0, 3]]
    assert mapped.references(rows) == [whole.references()[r] for r in rows]
    assert mapped.captions(7, 9) == whole.captions[7:9]


def rewrite(source, path, **changes):
    cache = read_cache(source)
    fields = dict(
        embeddings=cache.embeddings,
        image_ids=cache.image_ids,
        image_paths=cache.image_paths,
        splits=cache.splits.tolist(),
        captions=cache.captions,
        caption_image_index=cache.caption_image_index,
        failed_paths=[],
        failed_reasons=[],
        attrs={k: v for k, v in cache.attrs.items() if k not in ("format_version", "complete")},
    )
    write_cache(path, **{**fields, **changes})


def test_captions_are_tokenized_once_per_tokenizer_and_again_for_a_new_cache(
    tmp_path, shapes_cache, gpt2_dir
):
    features = tmp_path / "f.h5"
    shutil.copy(shapes_cache, features)
    tokenizer = load_tokenizer(str(gpt2_dir))
    cache = open_cache(features)
    table = load_token_table(cache, tokenizer, 40)
    [made] = tmp_path.glob("f.h5.tokens-*.h5")
    assert isinstance(table.token_ids, np.memmap)
    in_memory = tokenize(tokenizer, cache, 40)
    np.testing.assert_array_equal(table.token_ids, in_memory.token_ids)
    np.testing.assert_array_equal(table.offsets, in_memory.offsets)
    caption = cache.captions(0, 1)[0]
    first = table.token_ids[table.offsets[0] : table.offsets[1]].tolist()
    assert first == tokenizer(caption)["input_ids"] + [tokenizer.eos_token_id]

    # A second run finds the file and does not write it again.
    stamp = made.stat().st_mtime_ns
    load_token_table(open_cache(features), tokenizer, 40)
    assert made.stat().st_mtime_ns == stamp

    # Another caption limit is another file, its captions cut to 3 tokens and EOS.
    short = load_token_table(cache, tokenizer, 3)
    assert len(list(tmp_path.glob("f.h5.tokens-*.h5"))) == 2
    assert np.diff(short.offsets).max() == 4 and short.truncated > 0

    # A new cache at the same path is tokenized again.
    captions = read_cache(features).captions
    rewrite(features, features, captions=["a changed caption"] + captions[1:])
    changed = load_token_table(open_cache(features), tokenizer, 40)
    first = changed.token_ids[changed.offsets[0] : changed.offsets[1]].tolist()
    assert first == tokenizer("a changed caption")["input_ids"] + [tokenizer.eos_token_id]


def test_tokens_are_kept_in_memory_where_they_cannot_be_written(tmp_path, shapes_cache, gpt2_dir):
    features = tmp_path / "f.h5"
    shutil.copy(shapes_cache, features)
    tokenizer = load_tokenizer(str(gpt2_dir))
    cache = open_cache(features)
    # Something else already holds the token file's name: it cannot be replaced.
    from clipcap_cache.data.tokens import token_table_path

    token_table_path(cache, tokenizer, 40).mkdir()
    table = load_token_table(cache, tokenizer, 40)
    assert not isinstance(table.token_ids, np.memmap)
    np.testing.assert_array_equal(table.token_ids, tokenize(tokenizer, cache, 40).token_ids)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.bad_input("data loss")
def test_open_cache_refuses_nonfinite_embeddings_by_row(tmp_path, shapes_cache):
    embeddings = read_cache(shapes_cache).embeddings.copy()
    embeddings[200, 1] = np.nan
    embeddings[201, 0] = np.inf
    rewrite(shapes_cache, tmp_path / "nan.h5", embeddings=embeddings)
    with pytest.raises(ClipcapError, match=r"2 embeddings hold NaN or inf \(first: row 200,"):
        open_cache(tmp_path / "nan.h5")


def permuted(ids, offsets):
    ids[:] = np.random.default_rng(0).permutation(ids[:])


def out_of_vocabulary(ids, offsets):
    ids[5] = 60000


def falling_offsets(ids, offsets):
    offsets[10] = offsets[12] + 5


def offsets_past_the_end(ids, offsets):
    offsets[-1] = offsets[-1] + 100


@pytest.mark.bad_input("silent wrong result")
@pytest.mark.parametrize(
    "corrupt, also_rehash",
    [
        (permuted, False),  # same attributes, shuffled tokens: trained on silently before
        (out_of_vocabulary, True),  # an IndexError mid-epoch, even with a matching hash
        (falling_offsets, True),  # a broadcast error mid-epoch
        (offsets_past_the_end, True),
    ],
    ids=["permuted", "out-of-vocabulary", "falling-offsets", "past-the-end"],
)
def test_a_corrupted_token_file_is_made_again(
    tmp_path, shapes_cache, gpt2_dir, corrupt, also_rehash
):
    import h5py

    from clipcap_cache.data.tokens import content_hash, token_table_path

    features = tmp_path / "f.h5"
    shutil.copy(shapes_cache, features)
    tokenizer = load_tokenizer(str(gpt2_dir))
    cache = open_cache(features)
    good = tokenize(tokenizer, cache, 40)
    load_token_table(cache, tokenizer, 40)
    path = token_table_path(cache, tokenizer, 40)
    with h5py.File(path, "r+") as f:
        corrupt(f["token_ids"], f["offsets"])
        if also_rehash:  # a file whose hash agrees with its bad contents: the checks still hold
            f.attrs["content_hash"] = content_hash(f["token_ids"][()], f["offsets"][()])
    table = load_token_table(open_cache(features), tokenizer, 40)
    np.testing.assert_array_equal(table.token_ids, good.token_ids)
    np.testing.assert_array_equal(table.offsets, good.offsets)
