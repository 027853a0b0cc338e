"""training.data: batch order independent of the process layout, seeded augmentations, caches, prompt encoding."""

import json
import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from diffusers_sprint import SanaSprintPipeline, SanaSprintTransformer2DModel, TrigFlowScheduler
from diffusers_sprint.pipelines.pipeline_sana_sprint import DEFAULT_COMPLEX_HUMAN_INSTRUCTION
from diffusers_sprint.training.data import (
    CachedLatentDataset,
    ImageCaptionDataset,
    InvalidImageError,
    LayoutInvariantBatchSampler,
    PromptEncoder,
    build_latent_cache,
    caption_choices,
    check_metadata_files,
    collate_examples,
    encode_images,
    image_to_rgb,
    load_image_caption_dataset,
    preprocess_image,
    read_image,
    read_image_size,
    trim_prompt_padding,
    validate_image_dataset,
)
from diffusers_sprint.training.streaming import load_streaming_dataset


def _layout_batches(num_samples, batch_size, num_processes, accumulation, epoch=0, start_step=0):
    """{(step, micro-batch number j): keys} over all processes of a layout."""
    batches = {}
    for process in range(num_processes):
        sampler = LayoutInvariantBatchSampler(
            num_samples, batch_size, num_processes, process, accumulation, seed=3, shuffle=True
        )
        sampler.set_epoch(epoch, start_step)
        for position, keys in enumerate(sampler):
            step = start_step + position // accumulation
            micro = position % accumulation
            batches[(step, micro * num_processes + process)] = keys
    return batches


def test_every_layout_with_the_same_global_batch_sees_the_same_micro_batches():
    reference = _layout_batches(26, 2, 1, 4)
    assert len(reference) == 12  # 26 // 2 = 13 batches -> 3 steps of 4, the 13th dropped
    for num_processes, accumulation in ((2, 2), (4, 1)):
        assert _layout_batches(26, 2, num_processes, accumulation) == reference
    keys = [key for step_keys in reference.values() for key in step_keys]
    assert len(set(keys)) == 24 and all(epoch == 0 for epoch, _ in keys)


def test_epochs_reshuffle_and_resume_mid_epoch():
    first, second = _layout_batches(16, 2, 2, 1, epoch=0), _layout_batches(16, 2, 2, 1, epoch=1)
    assert first != second
    order = lambda batches: [i for k in sorted(batches) for _, i in batches[k]]  # noqa: E731
    assert sorted(order(first)) == sorted(order(second)) == list(range(16))
    resumed = _layout_batches(16, 2, 2, 1, epoch=1, start_step=2)
    assert resumed == {key: value for key, value in second.items() if key[0] >= 2}
    sampler = LayoutInvariantBatchSampler(16, 2, 2, 0, 1)
    sampler.set_epoch(0, 3)
    assert len(sampler) == len(list(sampler)) == 1
    with pytest.raises(ValueError, match="fewer than one step"):
        LayoutInvariantBatchSampler(7, 2, 2, 0, 2)
    with pytest.raises(ValueError, match="process_index"):
        LayoutInvariantBatchSampler(16, 2, 2, 2)


def test_preprocess_image_resizes_the_shorter_side_and_crops():
    image = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (20, 1, 3)))  # 40 x 20
    centre = preprocess_image(image, 10, center_crop=True)
    assert centre.shape == (3, 10, 10) and centre.min() >= -1 and centre.max() <= 1
    # Horizontal ramp resized to 20 x 10: the centre crop starts at column 5.
    resized = np.asarray(image.resize((20, 10), Image.Resampling.BILINEAR), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(centre.permute(1, 2, 0).numpy(), resized[:, 5:15], atol=1e-6)
    flipped = preprocess_image(image, 10, center_crop=True, flip=True)
    assert torch.equal(flipped, centre.flip(-1))
    offsets = {
        float(preprocess_image(image, 10, generator=torch.Generator().manual_seed(s))[0, 0, 0]) for s in range(20)
    }
    assert len(offsets) > 3  # random crops move


class _Rows:
    def __init__(self, num):
        generator = np.random.default_rng(0)
        self.rows = [
            {
                "img": Image.fromarray(generator.integers(0, 255, (12, 14, 3), dtype=np.uint8)),
                "txt": ["a red cat", "a red dog"] if i == 0 else f"a small {('red', 'blue', 'green')[i % 3]} house",
            }
            for i in range(num)
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def test_augmentations_are_functions_of_seed_epoch_and_index():
    dataset = ImageCaptionDataset(_Rows(6), "img", "txt", 8, random_flip=True, seed=1)
    a, b = dataset[(2, 3)], dataset[(2, 3)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    per_epoch = [dataset[(epoch, 0)] for epoch in range(12)]
    assert len({sample["caption"] for sample in per_epoch}) == 2  # the caption list is sampled
    assert len({tuple(sample["pixel_values"][0, 0].tolist()) for sample in per_epoch}) > 2  # crops and flips vary
    other_seed = ImageCaptionDataset(_Rows(6), "img", "txt", 8, random_flip=True, seed=2)
    assert any(not torch.equal(other_seed[(e, 1)]["pixel_values"], dataset[(e, 1)]["pixel_values"]) for e in range(4))
    batch = collate_examples([dataset[(0, i)] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and len(batch["caption"]) == 3


@pytest.fixture(scope="module")
def encoders(make_text_encoder, make_tokenizer, make_vae):
    return make_vae(), PromptEncoder(make_tokenizer(), make_text_encoder(), max_sequence_length=12)


def test_latent_cache_holds_both_flips_and_draws_them_like_the_image_dataset(encoders):
    vae, prompt_encoder = encoders
    dataset = ImageCaptionDataset(_Rows(5), "img", "txt", 8, random_flip=True, seed=4)
    done = []
    cache = build_latent_cache(dataset, vae, prompt_encoder, sigma_data=0.5, batch_size=2, progress=done.append)
    assert isinstance(cache, CachedLatentDataset) and sum(done) == 5 and len(cache) == 5
    for index in range(5):
        sample = dataset.load(index, epoch=0, flip=False, pick_caption=False)
        pixels = sample["pixel_values"][None]
        torch.testing.assert_close(cache.latents[index], encode_images(vae, pixels)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            cache.flipped_latents[index], encode_images(vae, pixels.flip(-1))[0], rtol=1e-5, atol=1e-5
        )
        embeds, mask = prompt_encoder([sample["caption"]])
        assert torch.equal(cache.prompt_attention_mask[index], mask[0])
        used = mask[0].bool()  # masked positions depend on the batch's longest caption; they are never attended
        torch.testing.assert_close(cache.prompt_embeds[index][used], embeds[0][used])
        for epoch in range(4):
            flipped = torch.equal(
                dataset[(epoch, index)]["pixel_values"], dataset.load(index, epoch, flip=True)["pixel_values"]
            )
            expected = cache.flipped_latents[index] if flipped else cache.latents[index]
            assert torch.equal(cache[(epoch, index)]["latents"], expected)


def test_encode_images_is_in_sigma_data_units(encoders):
    vae, _ = encoders
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1
    expected = vae.encode(pixels).latent * vae.config.scaling_factor * 0.5
    torch.testing.assert_close(encode_images(vae, pixels, sigma_data=0.5), expected)


@pytest.mark.parametrize("instruction", [True, False])
def test_prompt_encoder_matches_the_pipeline(
    instruction, make_text_encoder, make_tokenizer, make_vae, transformer_config
):
    tokenizer, text_encoder = make_tokenizer(), make_text_encoder()
    pipe = SanaSprintPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=make_vae(),
        transformer=SanaSprintTransformer2DModel(**transformer_config(sample_size=8)),
        scheduler=TrigFlowScheduler(),
    )
    kwargs = {"complex_human_instruction": DEFAULT_COMPLEX_HUMAN_INSTRUCTION if instruction else None}
    encoder = PromptEncoder(tokenizer, text_encoder, max_sequence_length=20, **kwargs)
    prompts = ["a red cat", "a big blue dog with a small green tree"]
    embeds, mask = encoder(prompts)
    expected = pipe.encode_prompt(prompts, max_sequence_length=20, **kwargs)
    torch.testing.assert_close(embeds, expected[0])
    assert torch.equal(mask, expected[1]) and embeds.shape[1] == 20
    null_embeds, null_mask = encoder.null()
    no_instruction = pipe.encode_prompt([""], max_sequence_length=20, complex_human_instruction=None)
    torch.testing.assert_close(null_embeds, no_instruction[0])
    assert null_mask.sum() == no_instruction[1].sum() >= 1


def test_trimming_padding_columns_changes_no_output(transformer_config):
    teacher = SanaSprintTransformer2DModel.from_config(transformer_config(student=False, sample_size=8))
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    embeds, mask = torch.randn(3, 10, 16), torch.zeros(3, 10, dtype=torch.long)
    mask[0, :3], mask[1, :5], mask[2, :2] = 1, 1, 1
    null, null_mask = torch.randn(1, 10, 16), torch.zeros(1, 10, dtype=torch.long)
    null_mask[0, :2] = 1
    trimmed = trim_prompt_padding(embeds, mask, null, null_mask)
    assert [tuple(x.shape[:2]) for x in trimmed] == [(3, 5), (3, 5), (1, 5), (1, 5)]
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0.2, 0.9, 1.4])
    with torch.no_grad():
        full = teacher.trigflow_forward(x, t, embeds, mask).sample
        cut = teacher.trigflow_forward(x, t, trimmed[0], trimmed[1]).sample
    torch.testing.assert_close(cut, full, rtol=1e-6, atol=1e-6)


def _write_imagefolder(folder, num=4):
    folder.mkdir()
    rows = []
    for i in range(num):
        Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_load_image_caption_dataset_from_imagefolder_and_save_to_disk(tmp_path):
    _write_imagefolder(tmp_path / "images")
    data = load_image_caption_dataset(train_data_dir=str(tmp_path / "images"), cache_dir=str(tmp_path / "cache"))
    assert len(data) == 4 and sorted(data["text"]) == [f"caption {i}" for i in range(4)]
    data.save_to_disk(str(tmp_path / "saved"))
    again = load_image_caption_dataset(dataset_name=str(tmp_path / "saved"), max_train_samples=3)
    assert len(again) == 3 and isinstance(again[0]["image"], Image.Image)
    with pytest.raises(ValueError, match="'caption' is not a column"):
        load_image_caption_dataset(dataset_name=str(tmp_path / "saved"), caption_column="caption")
    with pytest.raises(ValueError, match="exactly one"):
        load_image_caption_dataset()


def test_diffusers_teacher_pipeline_builds(
    tmp_path, make_diffusers_transformer, make_text_encoder, make_tokenizer, make_vae
):
    """The tiny teacher the script tests use is a plain diffusers SanaPipeline (sanity of the fixtures)."""
    from diffusers import SanaPipeline

    pipe = SanaPipeline(
        tokenizer=make_tokenizer(),
        text_encoder=make_text_encoder(),
        vae=make_vae(),
        transformer=make_diffusers_transformer(student=False, sample_size=8),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    pipe.save_pretrained(tmp_path)
    assert math.isclose(
        SanaSprintTransformer2DModel.from_pretrained(tmp_path / "transformer").effective_flow_time_scale, 1000.0
    )


# ---------------------------------------------------------------------------------------------------------------------
# Image reading rules and bad data
# ---------------------------------------------------------------------------------------------------------------------


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.concatenate([np.arange(256) * 257, np.random.default_rng(0).integers(0, 65536, 256)]).astype(np.uint16)
    array = values.reshape(16, 32)
    Image.fromarray(array).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as opened:
        assert opened.mode == "I;16"
        assert np.asarray(opened.convert("RGB")).mean() > 250  # Pillow's own conversion: nearly all white
    expected = np.rint(array.astype(np.float64) * 255 / 65535)
    rgb = np.asarray(read_image(tmp_path / "grey16.png"), dtype=np.float64)
    assert rgb.shape == (16, 32, 3) and np.abs(rgb - expected[..., None]).max() <= 1
    assert np.array_equal(rgb[0, :, 0], np.arange(32)) and np.array_equal(rgb[7, :, 0], np.arange(224, 256))
    # Mode I (32-bit int: how older Pillow and datasets hand out the same data) follows the same rule.
    as_int = Image.fromarray(array.astype(np.int32))
    assert as_int.mode == "I"
    assert np.abs(np.asarray(image_to_rgb(as_int), dtype=np.float64) - expected[..., None]).max() <= 1
    with pytest.raises(ValueError, match=r"mode I\) must hold values in \[0, 65535\]"):
        image_to_rgb(Image.fromarray(np.full((2, 2), 70000, np.int32)))
    # The training path: preprocess_image at the native size returns the 8-bit values in [-1, 1].
    pixels = preprocess_image(Image.open(tmp_path / "grey16.png"), 16, center_crop=True)
    centre = expected[:, 8:24] / 127.5 - 1
    assert np.abs(pixels[0].numpy() - centre).max() <= 1 / 127.5 + 1e-6


def _write_16_bit_png(path, array, color_type):
    """A 16-bit-per-channel PNG (Pillow cannot write these for colour): `array` (H, W, C) uint16."""
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", array.shape[1], array.shape[0], 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def test_16_bit_colour_pngs_keep_their_levels(tmp_path):
    ramp = (np.arange(64) * 1040).astype(np.uint16)  # 0 .. 65520
    rgb = np.stack([ramp, ramp[::-1], np.full_like(ramp, 40000)], -1)[None].repeat(2, 0)
    _write_16_bit_png(tmp_path / "rgb48.png", rgb, color_type=2)
    expected = np.rint(rgb / 257)
    assert np.abs(np.asarray(read_image(tmp_path / "rgb48.png"), dtype=np.float64) - expected).max() <= 1
    rgba = np.concatenate([rgb, np.full((2, 64, 1), 65535, np.uint16)], -1)
    rgba[0, :, 3] = 0  # the first row fully transparent
    _write_16_bit_png(tmp_path / "rgba64.png", rgba, color_type=6)
    read = np.asarray(read_image(tmp_path / "rgba64.png"), dtype=np.float64)
    assert (read[0] == 255).all() and np.abs(read[1] - expected[1]).max() <= 1


def test_float_images_are_read_as_zero_to_one():
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    rgb = np.asarray(image_to_rgb(Image.fromarray(ramp)), dtype=np.float64)
    assert np.abs(rgb[..., 1] - np.rint(ramp * 255)).max() == 0
    with pytest.raises(ValueError, match=r"mode F\) must hold values in \[0, 1\]; this one spans \[0, 255\]"):
        image_to_rgb(Image.fromarray(ramp * 255))


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)  # black everywhere; alpha 0, 255, 128
    rgba[:, :, 0] = 200
    rgba[:, 0, 3], rgba[:, 1, 3], rgba[:, 2, 3] = 0, 255, 128
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    rgb = np.asarray(read_image(tmp_path / "rgba.png"), dtype=np.float64)
    assert np.array_equal(rgb[0, 0], [255, 255, 255]) and np.array_equal(rgb[0, 1], [200, 0, 0])
    a = 128 / 255
    assert np.abs(rgb[0, 2] - [200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)]).max() <= 1
    assert np.asarray(Image.open(tmp_path / "rgba.png").convert("RGB"))[0, 0].tolist() == [200, 0, 0]  # the old rule
    grey_alpha = Image.fromarray(np.stack([np.zeros((2, 2), np.uint8), np.array([[0, 255], [0, 255]], np.uint8)], -1))
    assert grey_alpha.mode == "LA"
    assert np.asarray(image_to_rgb(grey_alpha))[:, :, 0].tolist() == [[255, 0], [255, 0]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png")
    assert np.asarray(read_image(tmp_path / "palette.png")).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    assert np.asarray(image_to_rgb(palette, background=(0, 0, 255)))[0, 0].tolist() == [0, 0, 255]


def test_emoji_loader_and_training_data_share_the_rule(tmp_path):
    from diffusers_sprint.toy import load_emoji_image

    rgba = np.random.default_rng(1).integers(0, 256, (6, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "emoji.png")
    emoji = np.asarray(load_emoji_image(str(tmp_path / "emoji.png"), resolution=6))
    dataset = ImageCaptionDataset([{"image": str(tmp_path / "emoji.png"), "text": "x"}], "image", "text", 6, True)
    pixels = ((dataset[0]["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    assert np.array_equal(emoji, pixels) and np.array_equal(emoji, np.asarray(image_to_rgb(Image.fromarray(rgba))))
    assert (emoji[rgba[..., 3] == 0] == 255).all()


def _write_png(path, seed=0, size=48):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def test_unreadable_images_name_the_row_and_the_file(tmp_path):
    folder = tmp_path / "images"
    _write_imagefolder(folder, num=5)
    _write_png(folder / "1.png", seed=1)
    data = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(data[: len(data) * 2 // 3])  # header intact, pixel data cut
    (folder / "3.png").write_bytes(b"not a png")
    hf = load_image_caption_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    order = [int(os.path.basename(row["image"]["path"])[0]) for row in _undecoded(hf)]
    dataset = ImageCaptionDataset(hf, "image", "text", 8, center_crop=True)
    row_truncated, row_garbage = order.index(1), order.index(3)
    with pytest.raises(InvalidImageError, match=rf"Row {row_truncated} of the training data \(.*1\.png\).*truncated"):
        dataset[row_truncated]
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=collate_examples)
    with pytest.raises(InvalidImageError, match=rf"Row {min(row_truncated, row_garbage)} .*[13]\.png"):
        next(iter(loader))
    assert dataset[order.index(0)]["pixel_values"].shape == (3, 8, 8)  # good rows still load

    bad = validate_image_dataset(hf, "image", "text")
    assert [row.index for row in bad] == sorted([row_truncated, row_garbage])
    assert {os.path.basename(row.path) for row in bad} == {"1.png", "3.png"}
    assert any("truncated" in row.reason for row in bad) and any("UnidentifiedImageError" in row.reason for row in bad)
    with pytest.raises(ValueError, match=r"2 of 5 rows .*cannot be used:\n  row \d \(.*\.png\): .*\n  row \d"):
        validate_image_dataset(hf, "image", "text", raise_error=True)

    # A saved dataset embeds the bytes; the error names the file it was made from.
    hf.save_to_disk(str(tmp_path / "saved"))
    saved = load_image_caption_dataset(dataset_name=str(tmp_path / "saved"))
    with pytest.raises(InvalidImageError, match=rf"Row {row_garbage} of the training data \(3\.png\)"):
        ImageCaptionDataset(saved, "image", "text", 8)[row_garbage]
    good = {"img": Image.new("RGB", (4, 4)), "txt": "ok"}
    rows = [good, {"img": None, "txt": "no image"}, {"img": b"", "txt": None}]
    found = validate_image_dataset(rows, "img", "txt")
    assert [(row.index, row.path) for row in found] == [(1, None), (2, None), (2, None)]
    assert "missing" in found[0].reason and found[2].reason.startswith(
        "Captions must be strings or non-empty lists of strings, got None"
    )
    with pytest.raises(ValueError, match="Row 2 of the training data: Captions must be strings"):
        ImageCaptionDataset([good, good, {"img": Image.new("RGB", (4, 4)), "txt": None}], "img", "txt", 4)[2]
    assert validate_image_dataset(rows[:1], "img", "txt") == []


def _undecoded(hf):
    import datasets

    return hf.cast_column("image", datasets.Image(decode=False))


def test_empty_data_gets_a_clear_error(tmp_path):
    import datasets

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"image folder '.*empty' \(--train_data_dir\) holds no image files"):
        load_image_caption_dataset(train_data_dir=str(tmp_path / "empty"))
    (tmp_path / "empty" / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no image files"):
        load_image_caption_dataset(train_data_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist or is not a folder"):
        load_image_caption_dataset(train_data_dir=str(tmp_path / "missing"))
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [], "text": []}, features=features).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"The dataset '.*saved' \(a `save_to_disk` folder\) holds no rows"):
        load_image_caption_dataset(dataset_name=str(tmp_path / "saved"))
    _write_imagefolder(tmp_path / "images", num=2)
    with pytest.raises(ValueError, match="`max_train_samples` must be >= 1"):
        load_image_caption_dataset(train_data_dir=str(tmp_path / "images"), max_train_samples=0)


def test_a_null_inside_a_caption_list_is_refused_naming_the_row():
    image = Image.new("RGB", (4, 4))
    rows = [{"img": image, "txt": ["a red house", "a blue house"]}, {"img": image, "txt": ["a blue house", None]}]
    dataset = ImageCaptionDataset(rows, "img", "txt", 4)
    assert dataset[(0, 0)]["caption"] in {"a red house", "a blue house"}
    expected = (
        "Row 1 of the training data: Captions must be strings or non-empty lists of strings; item 1 of "
        "['a blue house', None] is None (NoneType)."
    )
    for epoch in range(4):  # whichever item the epoch draws (before: "None" as a caption, half the time)
        with pytest.raises(ValueError) as error:
            dataset[(epoch, 1)]
        assert str(error.value) == expected
    with pytest.raises(
        ValueError, match=r"^Row 1 of the training data: Captions must .* item 0 of \[3\] is 3 \(int\)"
    ):
        ImageCaptionDataset([rows[0], {"img": image, "txt": [3]}], "img", "txt", 4).load(1, pick_caption=False)
    assert caption_choices(np.array(["a", "b"])) == ["a", "b"]
    bad = validate_image_dataset(rows, "img", "txt")
    assert [(row.index, row.reason) for row in bad] == [(1, expected.removeprefix("Row 1 of the training data: "))]


def test_bad_metadata_files_name_the_file_and_line(tmp_path):
    folder = tmp_path / "images"
    _write_imagefolder(folder, num=3)
    lines = (folder / "metadata.jsonl").read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"caption 1", b"caf\xe9")  # latin-1, not UTF-8
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines))
    metadata = folder / "metadata.jsonl"
    for load in (
        lambda: load_image_caption_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache")),
        lambda: load_image_caption_dataset(dataset_name=str(folder), cache_dir=str(tmp_path / "cache")),
        lambda: load_streaming_dataset(dataset_name=str(folder)),
    ):
        with pytest.raises(ValueError) as error:
            load()
        assert (
            str(error.value) == f"The metadata file {metadata}, line 2, is not UTF-8 (byte 36 of the line: b'\\xe9')."
        )
    lines[1] = b'{"file_name": "1.png", "text": "caption 1"'
    metadata.write_bytes(b"\n".join(lines))
    with pytest.raises(
        ValueError, match=rf"^The metadata file {metadata}, line 2, is not JSON: Expecting ',' delimiter"
    ):
        check_metadata_files(str(folder))
    lines[1] = b'["1.png", "caption 1"]'
    metadata.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=r"line 2, is not a JSON object: '\[\"1.png\", \"caption 1\"\]'"):
        check_metadata_files(str(folder))


def test_header_reads_raise_the_named_image_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (30, 20)).save(path)
    assert read_image_size(str(path)) == (20, 30) and read_image_size(path.read_bytes()) == (20, 30)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 600 pixels > 2 x 200: a decompression bomb
    for read in (read_image, read_image_size):
        with pytest.raises(
            InvalidImageError,
            match=rf"^Row 7 of the training data \({path}\) cannot be used: "
            "DecompressionBombError: Image size \\(600 pixels\\) exceeds limit",
        ) as error:
            read({"bytes": None, "path": str(path)}, index=7)
        assert (error.value.index, error.value.path) == (7, str(path))
