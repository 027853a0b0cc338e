"""training.streaming: WebDataset tar shards through `datasets`' streaming loader, layout-invariant and resumable."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_sprint.training.streaming import (
    StreamingImageCaptionDataset,
    find_caption,
    load_streaming_dataset,
    resolve_shards,
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
    with pytest.raises(ValueError, match=r"No caption in the sample \(tried \['txt'\]"):
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
