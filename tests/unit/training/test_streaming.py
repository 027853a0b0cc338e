"""training.streaming: WebDataset tar shards through `datasets`' streaming loader, layout-invariant and resumable."""

import gzip
import io
import json
import logging
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_sprint.training.data import InvalidImageError
from diffusers_sprint.training.streaming import (
    StreamingImageCaptionDataset,
    StreamPosition,
    check_shards,
    find_caption,
    load_streaming_dataset,
    resolve_shards,
    shard_problem,
)


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((12, 16, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 WebDataset shards x 5 samples, each a `png`, a `txt` and a `json` (`caption` in every third sample)."""
    folder = tmp_path_factory.mktemp("shards")
    for shard in range(3):
        with tarfile.open(folder / f"data-{shard:03d}.tar", "w") as tar:
            for i in range(5):
                n = shard * 5 + i
                sidecar = {"id": n, "caption": f"json caption {n}" if n % 3 == 2 else None}
                files = {"png": _png(10 * n), "txt": f"caption {n}".encode(), "json": json.dumps(sidecar).encode()}
                for extension, data in files.items():
                    info = tarfile.TarInfo(f"sample{n:04d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def _dataset(shards, **kwargs):
    stream = load_streaming_dataset(train_shards=[str(shards / "data-*.tar")])
    options = dict(resolution=8, batch_size=2, seed=0, center_crop=True)
    options.update(kwargs)
    return StreamingImageCaptionDataset(stream, "png", ["json.caption", "txt"], **options)


def _captions(batches):
    return [batch["caption"] for batch in batches]


def test_shards_stream_in_order_with_caption_fallback_and_whole_steps(shards):
    assert [p.rsplit("/", 1)[1] for p in resolve_shards([str(shards / "data-*.tar")])] == [
        "data-000.tar",
        "data-001.tar",
        "data-002.tar",
    ]
    with pytest.raises(ValueError, match="matches no file"):
        resolve_shards([str(shards / "nothing-*.tar")])
    dataset = _dataset(shards, gradient_accumulation_steps=2)  # a step: 2 x 2 = 4 rows; 15 rows -> 3 steps
    batches = list(dataset)
    assert len(batches) == 6 and all(b["pixel_values"].shape == (2, 3, 8, 8) for b in batches)
    expected = [f"json caption {n}" if n % 3 == 2 else f"caption {n}" for n in range(12)]
    assert sum(_captions(batches), []) == expected  # the last, incomplete step (rows 12-14) is dropped
    # the pixels are the rows' own images (value 10 n, mapped to [-1, 1])
    values = torch.cat([b["pixel_values"][:, 0, 0, 0] for b in batches])
    torch.testing.assert_close(values, torch.tensor([10 * n / 127.5 - 1 for n in range(12)]))
    assert find_caption({"json": {"caption": "x"}}, ["txt", "json.caption"]) == "x"
    assert find_caption({"json": {"caption": None}, "txt": "y"}, ["json.caption", "txt"]) == "y"
    with pytest.raises(ValueError, match=r"The sample: no caption \(tried \['txt'\]"):
        find_caption({"png": b""}, ["txt"])


def test_stream_is_layout_and_worker_invariant_and_resumes_at_its_position(shards):
    one = list(_dataset(shards, gradient_accumulation_steps=2, shuffle_buffer_size=4))
    ranks = [list(_dataset(shards, num_processes=2, process_index=p, shuffle_buffer_size=4)) for p in range(2)]
    assert _captions(ranks[0]) == _captions(one[0::2]) and _captions(ranks[1]) == _captions(one[1::2])
    for a, b in zip(ranks[0], one[0::2]):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    workers = torch.utils.data.DataLoader(
        _dataset(shards, gradient_accumulation_steps=2, shuffle_buffer_size=4), batch_size=None, num_workers=2
    )
    assert _captions(workers) == _captions(one)
    resumed = _dataset(shards, gradient_accumulation_steps=2, shuffle_buffer_size=4)
    resumed.set_epoch(0, start_step=1)
    assert _captions(resumed) == _captions(one[2:])  # exact: the same rows after the position
    resumed.set_epoch(1)
    second = list(resumed)
    assert _captions(second) != _captions(one)  # another epoch, another shuffle
    again = _dataset(shards, gradient_accumulation_steps=2, shuffle_buffer_size=4)
    again.set_epoch(1)
    assert _captions(again) == _captions(second)  # each epoch's shuffle is a fixed function of (seed, epoch)


def test_a_streamed_dataset_gives_the_map_style_batches_without_shuffling(tmp_path):
    """`load_dataset(folder, streaming=True)` vs the same folder map-style: unshuffled, the same rows, crops, flips."""
    from diffusers_sprint.training.data import (
        ImageCaptionDataset,
        LayoutInvariantBatchSampler,
        collate_examples,
        load_image_caption_dataset,
    )

    rows = []
    for i in range(9):
        array = np.random.default_rng(i).integers(0, 255, (10 + i, 14, 3), dtype=np.uint8)
        Image.fromarray(array).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": [f"caption {i}", f"other {i}"]})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    stream = load_streaming_dataset(dataset_name=str(tmp_path))
    streamed = StreamingImageCaptionDataset(
        stream, "image", ["text"], 8, batch_size=2, num_processes=2, process_index=1, seed=5, random_flip=True
    )
    mapped = load_image_caption_dataset(train_data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    images = ImageCaptionDataset(mapped, "image", "text", 8, random_flip=True, seed=5)
    sampler = LayoutInvariantBatchSampler(len(images), 2, num_processes=2, process_index=1, seed=5, shuffle=False)
    expected = [collate_examples([images[key] for key in keys]) for keys in sampler]
    got = list(streamed)
    assert len(got) == len(expected) == 2  # 9 rows, 4 per step: 2 steps, this process's second micro-batch each
    for a, b in zip(got, expected):
        assert a["caption"] == b["caption"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert {c.split()[0] for batch in got for c in batch["caption"]} <= {"caption", "other"}


def _write_shard(path, samples):
    """A WebDataset tar of `samples`: `[{extension: bytes}]`, sample `n` named `sample{n:04d}`."""
    with tarfile.open(path, "w") as tar:
        for n, files in enumerate(samples):
            for extension, data in files.items():
                info = tarfile.TarInfo(f"sample{n:04d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _six(offset=0):
    return [{"png": _png(10 * (n + offset)), "txt": f"caption {n + offset}".encode()} for n in range(6)]


def test_unreadable_shards_fail_at_start_naming_them_or_are_skipped(tmp_path, caplog):
    _write_shard(tmp_path / "good.tar", _six())
    _write_shard(tmp_path / "cut.tar", _six(6))
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])  # `datasets` alone yields 5 of its 6 samples, rc 0
    with pytest.raises(ValueError) as error:
        load_streaming_dataset(train_shards=[str(tmp_path / "*.tar")])
    cut = str(tmp_path / "cut.tar")
    assert f"1 of 2 WebDataset shards (--train_shards) cannot be read in full:\n  {cut}: it is truncated" in str(
        error.value
    )
    # cut exactly after a member: the headers alone look complete, the end-of-archive block is missing
    boundary = 512 + 512 * math.ceil(len(_six(6)[0]["png"]) / 512)  # the first member's header + padded data
    (tmp_path / "cut.tar").write_bytes(data[:boundary])
    expected = f"it is truncated: no end-of-archive block after its 1 members (at byte {boundary} of {boundary})"
    assert shard_problem(cut) == expected
    (tmp_path / "cut-in-data.tar").write_bytes(data[:552])  # inside the first member's data
    assert shard_problem(str(tmp_path / "cut-in-data.tar")) == (
        f"it is truncated: member 'sample0000.png' ends at byte {512 + len(_six(6)[0]['png'])}, the file has 552 bytes"
    )
    (tmp_path / "cut-in-data.tar").unlink()
    (tmp_path / "empty.tar").write_bytes(b"")
    assert shard_problem(str(tmp_path / "empty.tar")) == "it is empty (0 bytes)"
    (tmp_path / "junk.tar").write_bytes(b"junk" * 300)
    assert shard_problem(str(tmp_path / "junk.tar")).startswith("it is not a tar archive")
    _write_shard(tmp_path / "latin1.tar", [{"png": _png(1), "txt": "une maison bleue \xe0 Paris".encode("latin-1")}])
    assert shard_problem(str(tmp_path / "latin1.tar")) == (
        "member 'sample0000.txt' does not decode as .txt: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe0 "
        "in position 17: invalid continuation byte"
    )
    assert shard_problem(str(tmp_path / "good.tar")) is None
    gz = (tmp_path / "good.tar.gz").as_posix()
    with gzip.open(gz, "wb") as file:
        file.write((tmp_path / "good.tar").read_bytes())
    assert shard_problem(gz) is None
    compressed = Path(gz).read_bytes()
    Path(gz).write_bytes(compressed[: len(compressed) // 2])
    assert shard_problem(gz).startswith("it is truncated or damaged: EOFError: Compressed file ended")
    Path(gz).unlink()
    # skip_bad_shards: left out with one warning naming each, the good shard read in full
    with caplog.at_level(logging.WARNING, logger="diffusers_sprint.training.streaming"):
        stream = load_streaming_dataset(train_shards=[str(tmp_path / "*.tar")], skip_bad_shards=True)
    lines = caplog.records[-1].getMessage().split("\n")
    assert lines[0] == "Skipping 4 of 5 WebDataset shards (`skip_bad_shards`):"
    assert [line.split(": ")[0] for line in lines[1:]] == [
        f"  {tmp_path / name}" for name in ("cut.tar", "empty.tar", "junk.tar", "latin1.tar")
    ]
    assert [row["txt"] for row in stream] == [f"caption {n}" for n in range(6)]
    with pytest.raises(ValueError, match=r"5 of 5 WebDataset shards .* cannot be read in full"):
        check_shards([str(tmp_path / name) for name in ("cut.tar", "empty.tar", "junk.tar", "latin1.tar")] * 1 + [cut])


def test_a_resume_over_another_shard_list_is_refused_naming_the_shards(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    for shard in range(2):
        _write_shard(folder / f"{shard}.tar", _six(6 * shard))
    pattern = [str(folder / "*.tar")]
    position = StreamPosition(check_shards(resolve_shards(pattern)))
    position.epoch, position.step = 1, 3
    state = position.state_dict()
    assert state["shards"] == [{"path": str(folder / f"{i}.tar"), "size": 20480} for i in range(2)]
    same = StreamPosition(check_shards(resolve_shards(pattern)))
    same.load_state_dict(state)
    assert (same.epoch, same.step) == (1, 3)
    _write_shard(folder / "2.tar", _six(12))  # the glob gains a shard
    with pytest.raises(ValueError) as error:
        StreamPosition(check_shards(resolve_shards(pattern))).load_state_dict(state)
    assert str(error.value) == (
        f"The shards of --train_shards differ from those of the checkpoint (added: {folder / '2.tar'}): resuming at "
        "epoch 1, step 3 would train some rows twice and others never. Restore the checkpoint's shards, or start a "
        "new run."
    )
    (folder / "2.tar").unlink()
    _write_shard(folder / "1.tar", _six(6) + _six(12))
    (folder / "0.tar").rename(folder / "0-old.tar")
    with pytest.raises(
        ValueError,
        match=rf"added: {folder / '0-old.tar'}; removed: {folder / '0.tar'}; changed: "
        rf"{folder / '1.tar'} \(20480 -> \d+ bytes\)",
    ):
        StreamPosition(check_shards(resolve_shards(pattern))).load_state_dict(state)
    # the stream reads exactly the recorded shards
    stream = load_streaming_dataset(shards=[{"path": str(folder / "0-old.tar"), "size": 20480}])
    assert [row["txt"] for row in stream] == [f"caption {n}" for n in range(6)]


def test_stream_rows_name_their_shard_and_key_and_refuse_null_captions(tmp_path):
    rows = [
        {"png": _png(1), "txt": "fine", "__key__": "a", "__url__": "/d/0.tar"},
        {
            "png": _png(1),
            "txt": None,
            "json": {"caption": ["a blue house", None]},
            "__key__": "b",
            "__url__": "/d/0.tar",
        },
        {"png": _png(1), "txt": None, "json": None, "__key__": "c", "__url__": "/d/1.tar"},
        {"png": None, "txt": "no image", "__key__": "d", "__url__": "/d/1.tar"},
        {"png": b"junk", "txt": "bad image", "__key__": "e", "__url__": "/d/1.tar"},
    ]
    dataset = StreamingImageCaptionDataset(rows, "png", ["json.caption", "txt"], 8, batch_size=1, center_crop=True)
    assert dataset.sample(rows[0], 0, 0)["caption"] == "fine"
    with pytest.raises(ValueError) as error:
        dataset.sample(rows[1], 0, 1)
    assert str(error.value) == (
        "Sample 'b' of shard /d/0.tar (row 1 of the stream): Captions must be strings or non-empty lists of "
        "strings; item 1 of ['a blue house', None] is None (NoneType)."
    )
    with pytest.raises(ValueError) as error:
        dataset.sample(rows[2], 0, 2)
    assert str(error.value) == (
        "Sample 'c' of shard /d/1.tar (row 2 of the stream): no caption (tried ['json.caption', 'txt']; its "
        "non-null keys: ['__key__', '__url__', 'png'])."
    )
    with pytest.raises(ValueError) as error:
        dataset.sample(rows[3], 0, 3)
    assert str(error.value) == (
        "Sample 'd' of shard /d/1.tar (row 3 of the stream): no image in column 'png' (its non-null keys: "
        "['__key__', '__url__', 'txt'])."
    )
    with pytest.raises(
        InvalidImageError,
        match=r"^Sample 'e' of shard /d/1.tar \(row 4 of the stream\) cannot be "
        "used: UnidentifiedImageError",
    ):
        dataset.sample(rows[4], 0, 4)
