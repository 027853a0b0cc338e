"""training.buckets: Sana's aspect-ratio bins, nearest-bin crops, the one-bucket-per-step sampler; non-square LADD."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
from PIL import Image

from diffusers_sprint import SanaSprintTransformer2DModel
from diffusers_sprint.training import (
    DiscriminatorHead,
    DistillationBatch,
    DistillationConfig,
    DistillationState,
    SanaDiscriminator,
    SCMLossConfig,
    build_student,
    discriminator_step,
    generator_step,
)
from diffusers_sprint.training.buckets import (
    AspectRatioBucketBatchSampler,
    assign_buckets,
    image_size,
    nearest_bin,
    training_bins,
)
from diffusers_sprint.training.data import (
    ImageCaptionDataset,
    InvalidImageError,
    collate_examples,
    preprocess_image,
    read_image,
)


def test_training_bins_are_diffusers_tables_and_small_sizes_stay_distinct():
    for resolution, table in ((512, ASPECT_RATIO_512_BIN), (1024, ASPECT_RATIO_1024_BIN)):
        bins = training_bins(resolution, 32)
        assert bins == {ratio: (int(h), int(w)) for ratio, (h, w) in table.items()}
    small = training_bins(16, 2)
    sizes = list(small.values())
    assert len(set(sizes)) == len(sizes) == 20
    assert all(h % 2 == 0 and w % 2 == 0 for h, w in sizes)
    assert small["1.0"] == (16, 16)
    with pytest.raises(ValueError, match="multiple of 32"):
        training_bins(500, 32)


def test_images_go_to_the_nearest_bin_resized_and_cropped():
    bins = training_bins(1024, 32)
    assert nearest_bin(1000, 1000, bins) == (1024, 1024)
    assert nearest_bin(500, 1000, bins) == tuple(int(v) for v in ASPECT_RATIO_1024_BIN["0.5"])  # (704, 1408)
    assert nearest_bin(3000, 1000, bins) == tuple(int(v) for v in ASPECT_RATIO_1024_BIN["3.0"])
    # A 30 x 61 image (h x w): bin ratio 0.5 at base 16 -> (12, 22); the crop removes the excess of the longer side.
    array = np.zeros((30, 61, 3), np.uint8)
    array[:, :30] = 255  # left half white
    image = Image.fromarray(array)
    assert image_size(image) == (30, 61)
    target = nearest_bin(30, 61, training_bins(16, 2))
    assert target == (12, 22)
    pixels = preprocess_image(image, target, center_crop=True)
    assert pixels.shape == (3, 12, 22)
    # resized by max(12/30, 22/61) = 0.4 -> 12 x 24 (round(61 * 0.4)); centre crop drops one column each side
    assert pixels[:, :, :10].min() > 0.9 and pixels[:, :, 13:].max() < -0.9
    # a square target keeps the square preprocessing: shorter side to the resolution, then the crop
    assert preprocess_image(image, 12, center_crop=True).shape == (3, 12, 12)
    assert torch.equal(preprocess_image(image, 12, center_crop=True), preprocess_image(image, (12, 12), True))


def _sampler(buckets, **kwargs):
    return AspectRatioBucketBatchSampler(buckets, batch_size=2, seed=3, **kwargs)


def _buckets():
    return [(8, 16)] * 25 + [(16, 16)] * 50 + [(16, 8)] * 13  # 88 samples


def test_bucket_sampler_counts_shapes_and_coverage():
    buckets = _buckets()
    sampler = _sampler(buckets, gradient_accumulation_steps=2)  # a step: 2 micro-batches of 2 = 4 samples
    assert sampler.bucket_names == [(8, 16), (16, 8), (16, 16)]
    assert sampler.steps_per_bucket == [25 // 4, 13 // 4, 50 // 4] == [6, 3, 12]
    assert sampler.steps_per_epoch == 21 and sampler.dropped_per_epoch == 88 - 84
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 42
        seen = [index for batch in batches for _, index in batch]
        assert len(seen) == len(set(seen)) == 84  # no sample twice in an epoch
        steps = [batches[2 * k] + batches[2 * k + 1] for k in range(21)]
        for step, bucket in zip(steps, sampler.step_buckets(epoch)):
            assert {buckets[index] for _, index in step} == {bucket}  # one bucket per step
        assert Counter(sampler.step_buckets(epoch)) == {(8, 16): 6, (16, 8): 3, (16, 16): 12}
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sampler.step_buckets(0) != sampler.step_buckets(1)


def test_bucket_order_is_layout_invariant_deterministic_and_resumable():
    buckets = _buckets()
    one = _sampler(buckets, gradient_accumulation_steps=2)
    two = [_sampler(buckets, num_processes=2, process_index=p) for p in range(2)]
    for epoch in (0, 1):
        one.set_epoch(epoch)
        single = list(one)
        for sampler in two:
            sampler.set_epoch(epoch)
        per_rank = [list(sampler) for sampler in two]
        # micro-batch m of step k, process p  ==  global micro-batch m * P + p of the one-process run
        assert len(per_rank[0]) == len(per_rank[1]) == 21
        for k in range(21):
            assert per_rank[0][k] == single[2 * k] and per_rank[1][k] == single[2 * k + 1]
        assert two[0].step_buckets(epoch) == two[1].step_buckets(epoch) == one.step_buckets(epoch)
        again = _sampler(buckets, gradient_accumulation_steps=2)
        again.set_epoch(epoch)
        assert list(again) == single  # a new sampler (a new process) draws the same order
        again.set_epoch(epoch, start_step=8)
        assert list(again) == single[16:]  # resuming at step 8
    with pytest.raises(ValueError, match="samples per bucket"):
        AspectRatioBucketBatchSampler([(1, 2)] * 3 + [(2, 1)] * 3, batch_size=4)


def test_buckets_through_a_dataloader_give_one_shape_per_batch(tmp_path):
    sizes = [(20, 40), (40, 20), (30, 30), (22, 44), (44, 22), (29, 31)] * 2
    rows = []
    for i, (height, width) in enumerate(sizes):
        array = np.full((height, width, 3), 20 * i, np.uint8)
        path = tmp_path / f"{i}.png"
        Image.fromarray(array).save(path)
        rows.append({"image": str(path), "text": f"image {i}"})
    bins = training_bins(16, 2)
    targets = assign_buckets([image_size(row["image"]) for row in rows], bins)
    assert set(targets) == {(12, 22), (22, 12), (16, 16)}
    dataset = ImageCaptionDataset(rows, "image", "text", 16, center_crop=True, target_sizes=targets)
    sampler = AspectRatioBucketBatchSampler(targets, batch_size=2)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_examples)
    shapes = [tuple(batch["pixel_values"].shape[-2:]) for batch in loader]
    assert Counter(shapes) == {(12, 22): 2, (22, 12): 2, (16, 16): 2}
    with pytest.raises(ValueError, match="`target_sizes` has 3 entries for 12 rows"):
        ImageCaptionDataset(rows, "image", "text", 16, target_sizes=targets[:3])


# ---------------------------------------------------------------------------------------------------------------------
# The losses and the discriminator on non-square latents
# ---------------------------------------------------------------------------------------------------------------------


def test_discriminator_heads_are_token_wise_rings_for_any_token_count():
    torch.manual_seed(0)
    head = DiscriminatorHead(8, hidden_channels=8, kernel_size=9, virtual_batch_size=4).eval()
    for height, width in ((6, 10), (10, 6), (3, 7)):
        features = torch.randn(4, 8, height * width)
        logits = head(features)
        assert logits.shape == (4, height * width)
        # circular conv + token-wise layers: a cyclic shift of the tokens shifts the logits (a ring of any length)
        shifted = head(features.roll(5, dims=-1))
        torch.testing.assert_close(shifted, logits.roll(5, dims=-1), rtol=1e-5, atol=1e-6)


def test_distillation_steps_train_on_non_square_latents(make_diffusers_transformer):
    flow_teacher = make_diffusers_transformer(student=False, sample_size=8, num_layers=2)
    teacher = SanaSprintTransformer2DModel.from_config(flow_teacher.config, flow_time_scale=1.0)
    teacher.load_state_dict(flow_teacher.state_dict())
    teacher.eval().requires_grad_(False)
    student = build_student(teacher, logvar_head=True, generator=torch.Generator().manual_seed(0))
    discriminator = SanaDiscriminator(teacher, head_block_ids=[0, 1], head_channels=8, kernel_size=3)
    config = DistillationConfig(scm=SCMLossConfig(tangent_warmup_steps=0, guidance_scales=(2.0,)))
    generator = torch.Generator().manual_seed(1)
    embeds, mask = torch.randn(4, 5, 16, generator=generator), torch.ones(4, 5, dtype=torch.long)
    null, null_mask = torch.zeros(1, 5, 16), torch.ones(1, 5, dtype=torch.long)
    for height, width in ((4, 10), (10, 4), (6, 6)):
        latents = 0.5 * torch.randn(4, 4, height, width, generator=generator)
        batch = DistillationBatch(latents, embeds, mask, null, null_mask)
        student.zero_grad()
        out = generator_step(student, teacher, discriminator, batch, DistillationState(), config, generator)
        assert math.isfinite(out.loss.item())
        out.loss.backward()
        grads = [p.grad for p in student.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        logits = discriminator(latents, torch.full((4,), 1.0), embeds, mask)
        assert logits.shape == (4, 2 * height * width)  # one logit per token and head
        discriminator.zero_grad()
        d_out = discriminator_step(student, discriminator, batch, config, generator)
        d_out.loss.backward()
        assert math.isfinite(d_out.loss.item())
        assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in discriminator.parameters())


def test_image_size_names_the_row_and_file_as_the_image_reader_does(tmp_path, monkeypatch):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(InvalidImageError) as error:
        image_size({"bytes": None, "path": str(junk)}, index=4)
    with pytest.raises(InvalidImageError) as read_error:
        read_image({"bytes": None, "path": str(junk)}, index=4)
    assert str(error.value) == str(read_error.value)  # the same error, row and file named
    assert str(error.value).startswith(f"Row 4 of the training data ({junk}) cannot be used: UnidentifiedImageError")
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (40, 30)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1200 pixels: above twice the limit, refused from the header
    with pytest.raises(InvalidImageError, match=rf"^Row 9 of the training data \({bomb}\) cannot be used: Decomp"):
        image_size(str(bomb), index=9)
    # the same through a dataset's undecoded rows (as the training script's --multi_scale reads them)
    rows = [{"image": {"bytes": bomb.read_bytes(), "path": "bomb.png"}}]
    with pytest.raises(InvalidImageError, match=r"^Row 0 of the training data \(bomb.png\) cannot be used: Decomp"):
        [image_size(row["image"], index=i) for i, row in enumerate(rows)]
