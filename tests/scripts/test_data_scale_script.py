"""The training script with aspect-ratio buckets and the on-disk feature caches, end to end on tiny assets."""

import json
import math

import numpy as np
import pytest
import torch
from fixtures.script_runs import TEACHER_SCRIPT, base_args, read_log, run_script
from PIL import Image

from diffusers_sprint import SanaSprintPipeline


pytestmark = pytest.mark.slow
RATIOS = {(16, 32): "wide", (32, 16): "tall", (24, 24): "square"}  # (height, width) of the source images


@pytest.fixture(scope="module")
def multi_scale_images(tmp_path_factory):
    """12 captioned PNGs at 3 aspect ratios (1:2, 2:1, 1:1), 4 each."""
    folder = tmp_path_factory.mktemp("multi_scale")
    rows = []
    for i in range(12):
        (height, width), name = list(RATIOS.items())[i % 3]
        array = np.full((height, width, 3), 40 + 15 * i, np.uint8)
        array[height // 4 : height // 2, width // 4 : width // 2] = (200, 30, 30) if i % 2 else (30, 30, 200)
        Image.fromarray(array).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {'red' if i % 2 else 'blue'} {name} house"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def _args(assets, images, output, steps, **flags):
    args = base_args(assets, output, steps, **flags)
    args[args.index("--train_data_dir") + 1] = images
    return args


def test_multi_scale_toy_run_trains_and_samples_at_each_ratio(assets, multi_scale_images, tmp_path):
    output = tmp_path / "out"
    result = run_script(
        tmp_path, _args(assets, multi_scale_images, output, 6, multi_scale=True, center_crop=True, random_flip=True)
    )
    print(f"multi-scale run: {result.seconds:.1f} s")
    assert "3 aspect-ratio buckets" in result.stderr + result.stdout
    assert "12x22: 4, 16x16: 4, 22x12: 4" in result.stderr + result.stdout
    log = read_log(output)
    assert [row["step"] for row in log] == list(range(1, 7))
    for row in log:
        for key in ("generator_loss", "scm_loss", "adversarial_loss", "discriminator_loss"):
            assert math.isfinite(row[key]), (key, row)
    pipe = SanaSprintPipeline.from_pretrained(output)
    for height, width in ((12, 22), (22, 12), (16, 16)):
        image = pipe(
            "a red wide house",
            height=height,
            width=width,
            num_inference_steps=1,
            guidance_scale=4.5,
            use_resolution_binning=False,
            complex_human_instruction=None,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        assert image.shape == (1, height, width, 3) and np.isfinite(image).all() and image.std() > 0


COUNTING = """
import functools, os, runpy, sys
import diffusers, transformers
log = open(sys.argv.pop(1), "a")
def counting(cls):
    original = cls.__init__
    @functools.wraps(original)  # diffusers reads the config names from the signature
    def counted(self, *args, **kwargs):
        log.write(cls.__name__ + "\\n"); log.flush()
        original(self, *args, **kwargs)
    cls.__init__ = counted
for cls in (transformers.Gemma2Model, diffusers.AutoencoderDC):
    counting(cls)
sys.argv[0] = sys.argv[1]; del sys.argv[1]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _counted_run(tmp_path, args, name):
    """The script through a wrapper that records every Gemma2Model / AutoencoderDC construction."""
    from fixtures.script_runs import SCRIPT

    record = tmp_path / f"{name}.constructed"
    record.write_text("")
    wrapper = tmp_path / "counting_launcher.py"
    wrapper.write_text(COUNTING)
    run_script(tmp_path, [record, SCRIPT, *args], script=wrapper)
    return record.read_text().split()


def test_feature_cache_second_run_constructs_neither_vae_nor_text_encoder(assets, multi_scale_images, tmp_path):
    cache = tmp_path / "features"
    flags = dict(multi_scale=True, center_crop=True, random_flip=True, feature_cache_dir=cache)
    prompts = dict(validation_prompts=["a red wide house"], validation_steps=100)

    precompute = _args(assets, multi_scale_images, tmp_path / "pre", 4, precompute_only=True, **flags, **prompts)
    built = _counted_run(tmp_path, precompute, "pre")
    assert sorted(set(built)) == ["AutoencoderDC", "Gemma2Model"]
    assert not (tmp_path / "pre" / "training_log.jsonl").exists()  # precompute only: no training
    folders = sorted(p.name.split("-")[0] for p in cache.iterdir())
    assert folders == ["latents", "text"]
    from safetensors import safe_open

    keys = {kind: set() for kind in ("latents", "text")}
    for shard in cache.rglob("shard-*.safetensors"):
        with safe_open(shard, framework="pt") as file:
            keys[shard.parent.name.split("-")[0]] |= {name.split("/")[0] for name in file.keys()}
    assert len(keys["latents"]) == 24  # 12 images x 2 flips
    assert len(keys["text"]) == 6 + 1  # 6 distinct captions (the validation prompt is one), the empty prompt

    # The second run reads everything from the cache: no text encoder, no VAE (no validation images to decode).
    output = tmp_path / "cached"
    built = _counted_run(tmp_path, _args(assets, multi_scale_images, output, 4, **flags), "cached")
    assert built == []
    cached_log = read_log(output)
    assert all(math.isfinite(row["generator_loss"]) for row in cached_log)
    pipe = SanaSprintPipeline.from_pretrained(output)  # the copied tokenizer / text encoder / VAE folders load
    assert type(pipe.vae).__name__ == "AutoencoderDC" and type(pipe.text_encoder).__name__ == "Gemma2Model"

    # The same run without the cache: the same losses (latents from the same VAE, up to its batch rounding).
    fresh = tmp_path / "fresh"
    flags.pop("feature_cache_dir")
    run_script(tmp_path, _args(assets, multi_scale_images, fresh, 4, **flags))
    worst = 0.0
    for got, expected in zip(cached_log, read_log(fresh), strict=True):
        for key in ("scm_loss", "adversarial_loss", "discriminator_loss"):
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
            worst = max(worst, abs(got[key] - expected[key]) / max(abs(expected[key]), 1e-12))
    print(f"cached vs fresh losses: max relative difference {worst:.2e}")


def test_feature_cache_flags_are_checked(assets, multi_scale_images, tmp_path):
    for flags, message in (
        (dict(precompute_only=True), "--precompute_only fills the on-disk caches"),
        (dict(feature_cache_dir=tmp_path / "c"), "pass --center_crop"),
    ):
        result = run_script(tmp_path, _args(assets, multi_scale_images, tmp_path / "o", 1, **flags), check=False)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


@pytest.fixture(scope="module")
def tar_shards(tmp_path_factory):
    """2 WebDataset shards x 6 samples (`png` + `txt`), built here."""
    import io
    import tarfile

    folder = tmp_path_factory.mktemp("tar_shards")
    for shard in range(2):
        with tarfile.open(folder / f"train-{shard}.tar", "w") as tar:
            for i in range(6):
                n = 6 * shard + i
                array = np.full((20, 24, 3), 128, np.uint8)
                array[3 + n % 4 : 14 + n % 4, 5:19] = (40 * (n % 6), 200 - 30 * (n % 5), 90)
                buffer = io.BytesIO()
                Image.fromarray(array).save(buffer, format="PNG")
                caption = f"a {'small' if n % 2 else 'big'} {['red', 'green', 'blue'][n % 3]} house".encode()
                for extension, data in (("png", buffer.getvalue()), ("txt", caption)):
                    info = tarfile.TarInfo(f"{n:05d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def _stream_args(assets, tar_shards, output, steps, **flags):
    args = base_args(assets, output, steps, **flags)
    cut = args.index("--train_data_dir")
    return args[:cut] + ["--train_shards", str(tar_shards / "train-*.tar")] + args[cut + 2 :]


def test_webdataset_shards_train_and_resume_at_the_stream_position(assets, tar_shards, tmp_path):
    """12 rows, 4 per step (batch 2 x accumulation 2): 3 steps per epoch; 5 steps cross an epoch boundary."""
    flags = dict(image_column="png", caption_column="txt", shuffle_buffer_size=4, random_flip=True)
    flags["gradient_accumulation_steps"] = 2
    straight = tmp_path / "straight"
    run_script(tmp_path, _stream_args(assets, tar_shards, straight, 5, checkpointing_steps=10, **flags))
    log = read_log(straight)
    assert [row["epoch"] for row in log] == [0, 0, 0, 1, 1]
    resumed = tmp_path / "resumed"
    run_script(tmp_path, _stream_args(assets, tar_shards, resumed, 2, checkpointing_steps=2, **flags))
    run_script(
        tmp_path,
        _stream_args(assets, tar_shards, resumed, 5, checkpointing_steps=2, resume_from_checkpoint="latest", **flags),
    )
    assert read_log(resumed) == log  # the same batches after the position: every logged float bit for bit


def test_multi_scale_two_processes_match_one_and_resume_exactly(assets, multi_scale_images, tmp_path):
    """3 buckets of 4 images, global batch 4: one step per bucket and epoch; 4 steps cross an epoch boundary. 2 DDP
    processes x 2 samples == 1 process x 2 x 2 accumulation (same buckets and micro-batches; float summation order
    only), and a run resumed at step 2 logs exactly what the straight run logs."""
    from fixtures.script_runs import _assert_same_run, _env

    flags = dict(multi_scale=True, center_crop=True, random_flip=True)
    one, two = tmp_path / "one", tmp_path / "two"
    run_script(tmp_path, _args(assets, multi_scale_images, one, 4, gradient_accumulation_steps=2, **flags))
    run_script(
        tmp_path,
        _args(assets, multi_scale_images, two, 4, **flags),
        launcher="accelerate",
        num_processes=2,
        env=_env(tmp_path, ACCELERATE_USE_CPU="1"),
    )
    _assert_same_run(one, two)
    resumed = tmp_path / "resumed"
    run_script(
        tmp_path,
        _args(assets, multi_scale_images, resumed, 2, gradient_accumulation_steps=2, checkpointing_steps=2, **flags),
    )
    run_script(
        tmp_path,
        _args(
            assets,
            multi_scale_images,
            resumed,
            4,
            gradient_accumulation_steps=2,
            resume_from_checkpoint="latest",
            **flags,
        ),
    )
    assert read_log(resumed) == read_log(one)


def test_teacher_calibration_reads_an_empty_feature_cache(assets, multi_scale_images, tmp_path):
    """--calibrate_qk_norm's first batch through an empty --feature_cache_dir (before: `KeyError: 'latents'`)."""
    cache, output = tmp_path / "cache", tmp_path / "teacher"
    args = _args(assets, multi_scale_images, output, 1, resolution=32, center_crop=True, calibrate_qk_norm=True)
    args += ["--feature_cache_dir", cache]
    cut = args.index("--tangent_warmup_steps")  # a distillation flag
    run_script(tmp_path, args[:cut] + args[cut + 2 :], script=TEACHER_SCRIPT)
    assert [row["step"] for row in read_log(output)] == [1]
    assert len(list(cache.glob("latents-*/shard-*.safetensors"))) >= 1  # the calibration batch's latents were stored


def test_a_truncated_shard_stops_the_run_at_start_naming_it(assets, tar_shards, tmp_path):
    """`datasets` alone reads the first half of a cut shard and trains on it without a word."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for path in tar_shards.glob("train-*.tar"):
        (shards / path.name).write_bytes(path.read_bytes())
    data = (shards / "train-1.tar").read_bytes()
    (shards / "train-1.tar").write_bytes(data[: len(data) // 2 + 700])
    result = run_script(
        tmp_path,
        _stream_args(assets, shards, tmp_path / "out", 1, image_column="png", caption_column="txt"),
        check=False,
    )
    assert result.returncode != 0
    assert (
        "ValueError: 1 of 2 WebDataset shards (--train_shards) cannot be read in full:\n"
        f"  {shards / 'train-1.tar'}: it is truncated or damaged after its member 11 (unexpected end of data)\n"
        in result.stderr
    ), result.stderr[-3000:]
