"""training.feature_cache: sharded safetensors entries, content keys, model digests, lazy encoders."""

import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers_sprint.training.data import ImageCaptionDataset, InvalidImageError, PromptEncoder, collate_examples
from diffusers_sprint.training.feature_cache import (
    CachedLatentImageDataset,
    CachedPromptEncoder,
    FeatureCache,
    check_caches_writable,
    collate_cached_examples,
    fill_caches,
    image_content_hash,
    latent_key,
    model_digest,
    pad_text_entry,
    resolve_latents,
    text_entry,
    text_key,
)


def test_two_writers_share_one_cache_and_a_new_reader_sees_both(tmp_path):
    namespace = {"vae": "abc", "crop": "center"}
    first = FeatureCache(tmp_path, "latents", namespace, writer="0", shard_size=2)
    second = FeatureCache(tmp_path, "latents", namespace, writer="1", shard_size=10)
    assert first.folder == second.folder
    other = FeatureCache(tmp_path, "latents", {"vae": "other", "crop": "center"})
    assert other.folder != first.folder  # another model: another namespace
    tensors = {f"k{i}": torch.randn(4, 2 + i, 3) for i in range(5)}
    for i in range(3):
        first.put(f"k{i}", {"latents": tensors[f"k{i}"]})
    assert len(list(Path(first.folder).glob("shard-0-*.safetensors"))) == 1  # written at 2 entries
    for i in range(3, 5):
        second.put(f"k{i}", {"latents": tensors[f"k{i}"]})
    assert "k3" in second and "k3" not in first  # buffered, not yet on disk
    first.flush()
    second.flush()
    reader = FeatureCache(tmp_path, "latents", namespace)
    assert len(reader) == 5
    for key, tensor in tensors.items():
        assert torch.equal(reader.get(key)["latents"], tensor)  # shapes differ per entry (buckets)
    first.refresh()
    assert "k4" in first and torch.equal(first.get("k4")["latents"], tensors["k4"])
    with pytest.raises(KeyError):
        reader.get("missing")


def test_keys_follow_content_and_model_digests_follow_files(tmp_path):
    image = Image.fromarray(np.zeros((4, 6, 3), np.uint8))
    path = tmp_path / "a.png"
    image.save(path)
    assert image_content_hash(str(path)) == image_content_hash(path.read_bytes())
    assert image_content_hash({"bytes": None, "path": str(path)}) == image_content_hash(str(path))
    assert image_content_hash(image) != image_content_hash(Image.fromarray(np.ones((4, 6, 3), np.uint8)))
    h = image_content_hash(str(path))
    assert len({latent_key(h, (4, 6), False), latent_key(h, (4, 6), True), latent_key(h, (6, 4), False)}) == 3
    assert text_key("a cat", True) != text_key("a cat", False) != text_key("a dog", False)
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text('{"latent_channels": 4}')
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    digest = model_digest(folder)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copy / name).write_bytes((folder / name).read_bytes())
    assert model_digest(copy) == digest  # the same model elsewhere (another machine): the same key
    (copy / "model.safetensors").write_bytes(b"y" + b"x" * 99)
    assert model_digest(copy) != digest
    (copy / "model.safetensors").write_bytes(b"x" * 100)
    (copy / "config.json").write_text('{"latent_channels": 8}')
    assert model_digest(copy) != digest
    with pytest.raises(ValueError, match="does not exist"):
        model_digest(tmp_path / "nothing")


def test_cached_prompt_encoder_matches_the_encoder_and_builds_it_only_on_a_miss(
    tmp_path, make_text_encoder, make_tokenizer
):
    encoder = PromptEncoder(
        make_tokenizer(), make_text_encoder(), max_sequence_length=12, complex_human_instruction=None
    )
    built = []

    def make_encoder():
        built.append(1)
        return encoder

    prompts = ["a red cat", "a small blue house with a tree", "a red cat"]
    cache = FeatureCache(tmp_path, "text", {"text_encoder": "tiny"})
    cached = CachedPromptEncoder(cache, make_encoder, 12)
    embeds, mask = cached(prompts)
    expected_embeds, expected_mask = encoder(prompts)
    assert built == [1] and torch.equal(mask, expected_mask)
    valid = expected_mask.bool()
    assert torch.equal(embeds[valid], expected_embeds[valid])  # the unmasked tokens exactly
    assert (embeds[~valid] == 0).all()  # cut-off padding comes back as zeros
    null, null_mask = cached.null()
    torch.testing.assert_close(null[null_mask.bool()], encoder.null()[0][null_mask.bool()], rtol=0, atol=0)
    cache.flush()
    fresh = CachedPromptEncoder(FeatureCache(tmp_path, "text", {"text_encoder": "tiny"}), make_encoder, 12)
    again, again_mask = fresh(prompts)
    fresh.null()
    assert built == [1] and fresh.encoder is None  # all cached: never built
    assert torch.equal(again, embeds) and torch.equal(again_mask, mask)
    entry = text_entry(expected_embeds[0], expected_mask[0])
    assert entry["embeds"].shape[0] == int(expected_mask[0].sum())
    assert torch.equal(pad_text_entry(entry)[1], expected_mask[0])


def _encode(pixels):  # a stand-in VAE: (B, 3, H, W) -> (B, 2, H / 2, W / 2)
    return pixels[:, :2, ::2, ::2] * 3.0


def _images(tmp_path, captions, random_flip=False):
    rows = []
    for i, caption in enumerate(captions):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(path)
        rows.append({"image": str(path), "text": caption})
    return ImageCaptionDataset(rows, "image", "text", 8, center_crop=True, random_flip=random_flip)


def test_model_digest_sees_a_one_tensor_change_anywhere_in_the_weights(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = {f"block{i:02d}.weight": torch.randn(64, 1024) for i in range(24)}  # 6 MiB, 256 KiB per tensor
    save_file(tensors, path)
    digest, before = model_digest(folder), path.read_bytes()
    tensors["block12.weight"][10, 10] += 1.0
    save_file(tensors, path)
    after, mib = path.read_bytes(), 1 << 20
    assert before[:mib] == after[:mib] and before[-mib:] == after[-mib:] and before != after  # a change mid-file
    assert model_digest(folder) != digest


def test_a_truncated_cache_shard_is_dropped_named_and_encoded_again(tmp_path, caplog):
    cache = FeatureCache(tmp_path, "latents", {"vae": "x"})
    cache.put("a", {"latents": torch.ones(2, 4, 4)})
    first = cache.flush()
    cache.put("b", {"latents": torch.zeros(2, 4, 4)})
    second = cache.flush()
    data = Path(second).read_bytes()
    Path(second).write_bytes(data[: len(data) // 2])  # a crash mid-copy, a full disk
    with caplog.at_level(logging.WARNING, logger="diffusers_sprint.training.feature_cache"):
        reader = FeatureCache(tmp_path, "latents", {"vae": "x"})
    assert "a" in reader and "b" not in reader and reader.index["a"] == first
    message = caplog.records[-1].getMessage()
    assert message.startswith(f"Feature cache shard {second} cannot be read (SafetensorError: ")
    assert message.endswith(f"renamed to {Path(second).name + '.bad'!r}, its entries will be encoded again.")
    assert Path(second + ".bad").exists() and not Path(second).exists()
    reader.put("b", {"latents": torch.zeros(2, 4, 4)})  # a miss again: encoded and stored anew
    reader.flush()
    assert torch.equal(FeatureCache(tmp_path, "latents", {"vae": "x"}).get("b")["latents"], torch.zeros(2, 4, 4))


def _read_only(folder):
    """Make `folder` unwritable (also for root: `chattr +i` when mode bits do not stop it); the undo, or skip."""
    os.chmod(folder, 0o555)
    if os.access(folder, os.W_OK) and os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
            return lambda: (subprocess.run(["chattr", "-i", str(folder)]), os.chmod(folder, 0o755))
        os.chmod(folder, 0o755)
        pytest.skip("cannot make a folder read-only for root here")
    return lambda: os.chmod(folder, 0o755)


def test_a_read_only_cache_with_misses_is_refused_at_start(tmp_path):
    images = _images(tmp_path, ["a red house", "a blue house", "a tree"])
    dataset = CachedLatentImageDataset(images, FeatureCache(tmp_path / "cache", "latents", {"vae": "x"}))
    for index in range(2):
        dataset.cache.put(dataset.latent_key(index, False), {"latents": torch.zeros(2, 4, 4)})
    dataset.cache.flush()
    undo = _read_only(dataset.cache.folder)
    try:
        assert dataset.cache.writable().startswith("PermissionError: [Errno ")
        with pytest.raises(ValueError) as error:
            check_caches_writable(dataset)
        assert str(error.value).startswith(f"The feature cache folder {dataset.cache.folder!r} is not writable (")
        assert str(error.value).endswith(
            "and misses 1 of the 3 entries this run needs: fill it first (--precompute_only, with write access) or "
            "give a writable --feature_cache_dir."
        )
        complete = ImageCaptionDataset(images.rows[:2], "image", "text", 8, center_crop=True)
        check_caches_writable(CachedLatentImageDataset(complete, dataset.cache))  # a complete cache may be read-only
        with pytest.raises(
            ValueError,
            match=r"^The feature cache folder '.*' \(--feature_cache_dir '.*'\) cannot be "
            r"created: PermissionError: ",
        ):
            FeatureCache(dataset.cache.folder, "latents", {"vae": "y"})  # a new namespace under a read-only root
    finally:
        undo()


def test_batches_of_any_collation_resolve_their_latents(tmp_path):
    """The teacher's --calibrate_qk_norm batch is `collate_examples` of dataset items: none, some or all cached."""
    images = _images(tmp_path, ["a", "b", "c"])
    cache = FeatureCache(tmp_path / "cache", "latents", {"vae": "x"})
    dataset = CachedLatentImageDataset(images, cache)
    pixels = torch.stack([images[(0, i)]["pixel_values"] for i in range(3)])
    expected = _encode(pixels) * 0.5
    for collate in (collate_examples, collate_cached_examples):
        fresh = CachedLatentImageDataset(images, FeatureCache(tmp_path / collate.__name__, "latents", {"vae": "x"}))
        batch = collate([fresh[(0, i)] for i in range(3)])  # nothing cached (before: KeyError 'latents')
        assert torch.equal(resolve_latents(batch, fresh.cache, _encode, 0.5, "cpu"), expected)
    cache.put(dataset.latent_key(1, False), {"latents": _encode(pixels[1:2])[0]})
    mixed = collate_examples([dataset[(0, i)] for i in range(3)])
    assert mixed["latents"][0] is None and isinstance(mixed["latents"][1], torch.Tensor)
    assert torch.equal(resolve_latents(mixed, cache, _encode, 0.5, "cpu"), expected)
    full = collate_examples([dataset[(0, i)] for i in range(3)])  # all cached now: stacked
    assert full["latents"].shape == (3, 2, 4, 4) and "pixel_values" not in full
    assert torch.equal(resolve_latents(full, cache, lambda pixels: 1 / 0, 0.5, "cpu"), expected)


def test_cache_readers_name_the_row_of_a_bad_caption_or_image(tmp_path, make_text_encoder, make_tokenizer):
    images = _images(tmp_path, ["a red house", ["a blue house", None]])
    dataset = CachedLatentImageDataset(images, FeatureCache(tmp_path / "cache", "latents", {"vae": "x"}))
    expected = (
        "Row 1 of the training data: Captions must be strings or non-empty lists of strings; item 1 of "
        "['a blue house', None] is None (NoneType)."
    )
    encoder = PromptEncoder(
        make_tokenizer(), make_text_encoder(), max_sequence_length=8, complex_human_instruction=None
    )
    prompts = CachedPromptEncoder(FeatureCache(tmp_path / "cache", "text", {"t": "x"}), lambda: encoder, 8)
    with pytest.raises(ValueError) as error:  # before: "None" was encoded as a caption
        fill_caches(dataset, prompts, _encode, batch_size=2)
    assert str(error.value) == expected
    with pytest.raises(ValueError) as error:  # a cached latent: the caption is read without the image
        dataset[(0, 1)]
    assert str(error.value) == expected
    os.remove(tmp_path / "0.png")
    with pytest.raises(InvalidImageError, match=rf"^Row 0 of the training data \({tmp_path / '0.png'}\) cannot be "):
        CachedLatentImageDataset(images, dataset.cache).latent_key(0, False)
