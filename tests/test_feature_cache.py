"""training.feature_cache: sharded safetensors entries, content keys, model digests, lazy encoders."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_components import make_text_encoder, make_tokenizer

from diffusers_sprint.training.data import PromptEncoder
from diffusers_sprint.training.feature_cache import (
    CachedPromptEncoder,
    FeatureCache,
    image_content_hash,
    latent_key,
    model_digest,
    pad_text_entry,
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


def test_cached_prompt_encoder_matches_the_encoder_and_builds_it_only_on_a_miss(tmp_path):
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
