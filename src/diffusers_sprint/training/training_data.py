"""The training data of a run: the dataset (map-style, streaming or on-disk cache), its sampler, and the
per-step `DistillationBatch`es with encoded latents and captions.
"""

import atexit
import os
from collections import Counter

import torch

from .buckets import AspectRatioBucketBatchSampler, assign_buckets, image_size, training_bins
from .data import (
    ImageCaptionDataset,
    LayoutInvariantBatchSampler,
    build_latent_cache,
    collate_examples,
    encode_images,
    load_image_caption_dataset,
    trim_prompt_padding,
    undecoded_images,
    validate_image_dataset,
)
from .distill import DistillationBatch
from .feature_cache import (
    CachedLatentImageDataset,
    CachedPromptEncoder,
    FeatureCache,
    check_caches_writable,
    collate_cached_examples,
    fill_caches,
    resolve_latents,
)
from .recipe import controlnet_training
from .streaming import (
    StreamingImageCaptionDataset,
    StreamPosition,
    check_shards,
    load_streaming_dataset,
    resolve_shards,
)


class TrainingData:
    """
    The dataset (optionally latent-cached, in memory or on disk), its layout-invariant sampler (one aspect-ratio
    bucket per step with `--multi_scale`) and loader, and `batch(examples)` that turns a collated batch into a
    [`DistillationBatch`] on the device.

    The loader is not `accelerator.prepare`d: [`LayoutInvariantBatchSampler`] (and
    [`AspectRatioBucketBatchSampler`]) already give each process its micro-batches, numbered so that 1 process x
    accumulation 4, 2 processes x 2 and 4 processes x 1 see the same samples, and a resumed run the same as an
    uninterrupted one (accelerate's sharding would split differently).
    """

    def __init__(self, args, accelerator, base, prompt_encoder, seed: int, patch_size: int, logger):
        vae_config = base.config("vae")
        vae_scale = 2 ** (len(vae_config["encoder_block_out_channels"]) - 1)
        latent_scale = vae_scale * patch_size
        if args.resolution % latent_scale:
            raise ValueError(f"--resolution must be a multiple of {latent_scale} (VAE scale x patch size).")
        if args.multi_scale and args.cache_latents:
            raise ValueError(
                "--cache_latents keeps one image size in memory; with --multi_scale use --feature_cache_dir."
            )
        if args.feature_cache_dir and args.cache_latents:
            raise ValueError("Give one of --cache_latents (in memory) and --feature_cache_dir (on disk).")
        self.args, self.device, self.base = args, accelerator.device, base
        self.prompt_encoder = prompt_encoder
        self.null_embeds, self.null_mask = prompt_encoder.null(self.device)
        self.latent_cache = None
        self.streaming = args.streaming
        if self.streaming:
            self._init_streaming(args, accelerator, seed)
            return
        with accelerator.main_process_first():
            hf_dataset = load_image_caption_dataset(
                args.dataset_name,
                args.dataset_config_name,
                args.train_data_dir,
                args.cache_dir,
                args.image_column,
                args.caption_column,
                args.max_train_samples,
            )
        if args.validate_data:
            validate_image_dataset(hf_dataset, args.image_column, args.caption_column, raise_error=True)
            logger.info(f"--validate_data: all {len(hf_dataset)} rows read.")
        target_sizes = None
        if args.multi_scale:
            bins = training_bins(args.resolution, latent_scale)
            rows = undecoded_images(hf_dataset, args.image_column)  # headers only: nothing is decoded
            if hasattr(rows, "select_columns"):
                rows = rows.select_columns([args.image_column])
            sizes = [image_size(row[args.image_column], index=i) for i, row in enumerate(rows)]
            target_sizes = assign_buckets(sizes, bins)
            counts = Counter(target_sizes)
            logger.info(
                f"--multi_scale: {len(counts)} aspect-ratio buckets of {len(bins)} bins at {args.resolution} px: "
                + ", ".join(f"{h}x{w}: {n}" for (h, w), n in sorted(counts.items()))
            )
        conditioning_column = args.conditioning_image_column if controlnet_training(args) else None
        if conditioning_column is not None and conditioning_column not in hf_dataset.column_names:
            raise ValueError(
                f"`--conditioning_image_column` {conditioning_column!r} is not a column of the dataset (ControlNet "
                f"distillation needs a control image per row); columns: {hf_dataset.column_names}."
            )
        self.images = ImageCaptionDataset(
            hf_dataset,
            args.image_column,
            args.caption_column,
            args.resolution,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            seed=seed,
            target_sizes=target_sizes,
            conditioning_image_column=conditioning_column,
        )
        self.cached = args.cache_latents
        collate = collate_examples
        if args.feature_cache_dir:
            namespace = dict(vae=base.identity("vae"), crop="center")
            self.latent_cache = FeatureCache(args.feature_cache_dir, "latents", namespace, writer=_writer_name())
            self.dataset = CachedLatentImageDataset(self.images, self.latent_cache)
            cached_prompts = prompt_encoder if isinstance(prompt_encoder, CachedPromptEncoder) else None
            check_caches_writable(self.dataset, cached_prompts, args.validation_prompts or ())  # before any training
            collate = collate_cached_examples
            atexit.register(self.flush)
        elif self.cached:
            self.dataset = build_latent_cache(
                self.images, base.vae, prompt_encoder, args.sigma_data, args.train_batch_size, self.device
            )
            # the text encoder is not needed any more; the VAE only decodes validation images
            base.text_encoder = self.prompt_encoder = None
            base.vae.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            self.dataset = self.images
        layout = dict(
            batch_size=args.train_batch_size,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            seed=seed,
        )
        if args.multi_scale:
            self.sampler = AspectRatioBucketBatchSampler(target_sizes, **layout)
            if self.sampler.dropped_per_epoch:
                logger.info(
                    f"--multi_scale: {self.sampler.dropped_per_epoch} samples per epoch do not fill a whole step in "
                    "their bucket and wait for a later epoch."
                )
        else:
            self.sampler = LayoutInvariantBatchSampler(len(self.dataset), **layout)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=args.dataloader_num_workers,
        )

    def _init_streaming(self, args, accelerator, seed: int) -> None:
        # the shards are resolved and checked once; the position keeps their list (a resume over others is refused)
        shards = check_shards(resolve_shards(args.train_shards), args.skip_bad_shards) if args.train_shards else None
        stream = load_streaming_dataset(
            args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, shards=shards
        )
        if args.max_train_samples is not None:
            stream = stream.take(args.max_train_samples)
        self.cached, self.sampler = False, None
        self.dataset = StreamingImageCaptionDataset(
            stream,
            args.image_column,
            [args.caption_column] + list(args.caption_fallback_columns or []),
            args.resolution,
            args.train_batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            args.gradient_accumulation_steps,
            seed=seed,
            shuffle_buffer_size=args.shuffle_buffer_size,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
        )
        # (epoch, step) of the stream, saved and restored by accelerator.save_state / load_state
        self.position = StreamPosition(shards)
        accelerator.register_for_checkpointing(self.position)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=args.dataloader_num_workers
        )

    def describe(self) -> str:
        """Dataset size and steps per epoch, for the run's log."""
        if self.streaming:
            source = f"{len(self.args.train_shards)} shard patterns" if self.args.train_shards else "a stream"
            return f"Streaming {source}, resuming at epoch {self.position.epoch}, step {self.position.step}"
        return f"Num examples = {len(self.dataset)}, steps per epoch = {self.sampler.steps_per_epoch}"

    def _stream_steps(self):
        epoch, step = self.position.epoch, self.position.step
        while True:
            self.dataset.set_epoch(epoch, step)
            iterator, yielded = iter(self.loader), False
            while True:
                micro_batches = []
                for _ in range(self.args.gradient_accumulation_steps):
                    examples = next(iterator, None)
                    if examples is None:
                        break
                    micro_batches.append(self.batch(examples))
                if len(micro_batches) < self.args.gradient_accumulation_steps:
                    break
                step, yielded = step + 1, True
                self.position.epoch, self.position.step = epoch, step
                yield epoch, micro_batches
            if not yielded and step == 0:
                raise ValueError(
                    "The stream holds fewer rows than one step's global batch (batch size x accumulation x processes)."
                )
            epoch, step = epoch + 1, 0

    def _encode_unit_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return encode_images(self.base.vae, pixel_values, sigma_data=1.0)  # vae_latent * scaling_factor

    def flush(self) -> None:
        """Write the feature caches' buffered entries (also at exit)."""
        for cache in (self.latent_cache, getattr(self.prompt_encoder, "cache", None)):
            if cache is not None:
                cache.flush()

    def precompute(self, accelerator, validation_prompts, logger) -> None:
        """`--precompute_only`: fill the feature caches (each process a share of the rows), then wait for all."""
        counts = fill_caches(
            self.dataset,
            self.prompt_encoder,
            self._encode_unit_latents,
            self.args.train_batch_size,
            accelerator.process_index,
            accelerator.num_processes,
            extra_prompts=validation_prompts or (),
            device=self.device,
        )
        accelerator.wait_for_everyone()
        logger.info(
            f"--precompute_only: process {accelerator.process_index} encoded {counts['latents']} latents and "
            f"{counts['captions']} captions into {self.args.feature_cache_dir}.",
            main_process_only=False,
        )

    def batch(self, examples: dict) -> DistillationBatch:
        if self.latent_cache is not None:
            latents = resolve_latents(
                examples, self.latent_cache, self._encode_unit_latents, self.args.sigma_data, self.device
            )
            embeds, mask = self.prompt_encoder(examples["caption"], self.device)
        elif self.cached:
            latents = examples["latents"].to(self.device)
            embeds = examples["prompt_embeds"].to(self.device)
            mask = examples["prompt_attention_mask"].to(self.device)
        else:
            latents = encode_images(self.base.vae, examples["pixel_values"].to(self.device), self.args.sigma_data)
            embeds, mask = self.prompt_encoder(examples["caption"], self.device)
        control = None
        if "control_latents" in examples:
            control = examples["control_latents"].to(self.device)
        elif "conditioning_pixel_values" in examples:
            control = self._encode_unit_latents(examples["conditioning_pixel_values"].to(self.device))
        embeds, mask, null, null_mask = trim_prompt_padding(embeds, mask, self.null_embeds, self.null_mask)
        return DistillationBatch(latents, embeds, mask, null, null_mask, control_latents=control)

    def steps(self, start_step: int):
        """Yields `(epoch, [micro-batch, ...])` for every step from `start_step` on; epochs end on step boundaries."""
        if self.streaming:  # the position was restored with the checkpoint (`StreamPosition`)
            yield from self._stream_steps()
            return
        steps_per_epoch = self.sampler.steps_per_epoch
        epoch = start_step // steps_per_epoch
        self.sampler.set_epoch(epoch, start_step % steps_per_epoch)
        iterator = iter(self.loader)
        while True:
            micro_batches = []
            for _ in range(self.args.gradient_accumulation_steps):
                examples = next(iterator, None)
                if examples is None:
                    self.flush()
                    epoch += 1
                    self.sampler.set_epoch(epoch)
                    iterator = iter(self.loader)
                    examples = next(iterator)
                micro_batches.append(self.batch(examples))
            yield epoch, micro_batches


def _writer_name() -> str:
    return f"{os.environ.get('RANK', '0')}-{os.getpid()}"
