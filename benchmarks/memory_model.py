"""Per-rank memory of SANA-Sprint distillation on paper: model states under DDP and FSDP2, no GPU needed.

The student, the frozen teacher and the LADD discriminator heads of the released Sana configs
(`benchmarks/sana_configs.py`) are built on the `meta` device (shapes, no storage) and their parameters counted.
Per rank, in bytes:

| item | DDP | FSDP2 |
| --- | --- | --- |
| student parameters (fp32 master weights) | 4 P | 4 shard(P) |
| student gradients (fp32) | 4 P | 4 shard(P) |
| AdamW states (`exp_avg`, `exp_avg_sq`, fp32) | 8 P | 8 shard(P) |
| EMA of the student (fp32, `--ema`) | 4 P | 4 shard(P) |
| frozen teacher (`--teacher-dtype` b bytes; no grads, no optimizer) | b P_T | b P_T, or b shard(P_T) |
| LADD heads (params + grads + AdamW in fp32; spectral-norm buffers) | 16 P_H + 4 B_H | same, or sharded |
| communication buffers | DDP gradient buckets, 4 (P + P_H) | all-gather working set |

`shard(P)` is what `torch.distributed.fsdp.fully_shard` keeps per rank: every parameter is split along dim 0 into
`N` chunks of `ceil(dim0 / N)` rows (the last ones padded), so `shard(P) = sum ceil(dim0 / N) * prod(other dims)`,
`P / N` plus at most one row per parameter. Under FSDP2 the teacher is sharded or not (`--teacher-sharding`), the
heads only with `--shard-heads` (else they are replicated and all-reduced like DDP).

DDP's buckets are a second copy of the gradients (torch's default `gradient_as_bucket_view=False`, also
accelerate's); `--ddp-bucket-view` drops them; with one process accelerate does not wrap the model and there are
none. FSDP2's working set, with the student sharded per transformer block plus a root unit (the embeddings, caption
projection and output layer): the root's parameters stay gathered through the forward, the current and the
prefetched block are gathered at once, in `--gather-dtype` (`MixedPrecisionPolicy(param_dtype=bf16)`), and one
block's unsharded gradients exist in fp32 (`reduce_dtype`) before its reduce-scatter; the same for a sharded
teacher (without gradients) and, with `--shard-heads`, per head.

**Activations are not modelled**: they depend on batch size, resolution, gradient checkpointing and the step
(`benchmarks/bench_train_step.py` measures the training step's peaks). Neither are the CUDA context (~0.5-1 GiB),
allocator fragmentation, the VAE / text encoder (the default recipe trains on precomputed latents and embeddings)
or the optimizer's temporary buffers.

    python benchmarks/memory_model.py                               # 0.6B, 1.6B, 4.8B at 1, 8, 32 ranks
    python benchmarks/memory_model.py --teacher-dtype fp32 --shard-heads --json memory.json
"""

import argparse
import dataclasses
import json
import math
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sana_configs  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from diffusers_sprint import SanaSprintTransformer2DModel  # noqa: E402
from diffusers_sprint.training.ladd import SanaDiscriminator, default_head_block_ids  # noqa: E402


GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
LAYOUTS = ("ddp", "fsdp2")
ITEMS = ("student_params", "student_grads", "adam_states", "ema", "teacher", "heads", "comm")


@dataclasses.dataclass(frozen=True)
class ModuleShapes:
    """Parameter shapes of a module, split into FSDP2 units: `root` (not in any unit) and one list per unit."""

    root: tuple[torch.Size, ...]
    units: tuple[tuple[torch.Size, ...], ...]
    buffer_numel: int = 0

    @property
    def all(self) -> tuple[torch.Size, ...]:
        return self.root + tuple(shape for unit in self.units for shape in unit)

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.all)

    @property
    def largest_unit_numel(self) -> int:
        return max((sum(math.prod(shape) for shape in unit) for unit in self.units), default=0)

    @property
    def root_numel(self) -> int:
        return sum(math.prod(shape) for shape in self.root)


@dataclasses.dataclass(frozen=True)
class TrainingModels:
    """Shapes of what one distillation rank holds: trainable student, frozen teacher, trainable heads."""

    name: str
    student: ModuleShapes
    teacher: ModuleShapes
    heads: ModuleShapes
    head_block_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class MemoryOptions:
    """What the layout shards and in which precisions (see the module docstring)."""

    teacher_dtype: str = "bf16"
    shard_teacher: bool = False
    shard_heads: bool = False
    ema: bool = False
    gather_dtype: str = "bf16"
    ddp_bucket_view: bool = False

    def __post_init__(self):
        for field in ("teacher_dtype", "gather_dtype"):
            value = getattr(self, field)
            if value not in DTYPE_BYTES:
                raise ValueError(f"`{field}` must be one of {sorted(DTYPE_BYTES)}, got {value!r}.")


def module_shapes(module: nn.Module, unit_lists: tuple[nn.ModuleList, ...] = ()) -> ModuleShapes:
    """Parameter shapes of `module`, each child of the `unit_lists` one FSDP2 unit, the rest the root."""
    unit_modules = [child for unit_list in unit_lists for child in unit_list]
    in_unit = {id(parameter) for child in unit_modules for parameter in child.parameters()}
    root = tuple(parameter.shape for parameter in module.parameters() if id(parameter) not in in_unit)
    units = tuple(tuple(parameter.shape for parameter in child.parameters()) for child in unit_modules)
    buffers = sum(buffer.numel() for buffer in module.buffers())
    return ModuleShapes(root=root, units=units, buffer_numel=buffers)


def build_training_models(
    config: dict, name: str = "", head_block_ids=None, head_channels: int | None = None
) -> TrainingModels:
    """Student, teacher and discriminator of a released config, on the `meta` device (no memory, no init cost)."""
    with torch.device("meta"):
        teacher = SanaSprintTransformer2DModel(**sana_configs.teacher_config(config))
        student = SanaSprintTransformer2DModel(**sana_configs.student_config(config))
        if head_block_ids is None:
            head_block_ids = default_head_block_ids(len(teacher.transformer_blocks))
        discriminator = SanaDiscriminator(teacher, head_block_ids=head_block_ids, head_channels=head_channels)
    return TrainingModels(
        name=name,
        student=module_shapes(student, (student.transformer_blocks,)),
        teacher=module_shapes(teacher, (teacher.transformer_blocks,)),
        heads=module_shapes(discriminator, (discriminator.heads,)),
        head_block_ids=tuple(discriminator.head_block_ids),
    )


def sharded_numel(shapes, world_size: int) -> int:
    """Elements one rank holds when FSDP2 shards each parameter along dim 0 over `world_size` ranks (padded)."""
    if world_size < 1:
        raise ValueError(f"`world_size` must be >= 1, got {world_size}.")
    total = 0
    for shape in shapes:
        if len(shape) == 0:
            total += 1
            continue
        total += math.ceil(shape[0] / world_size) * math.prod(shape[1:])
    return total


def memory_per_rank(models: TrainingModels, layout: str, world_size: int, options: MemoryOptions) -> dict[str, int]:
    """Bytes per rank for each item of `ITEMS` (and their `total`) under `layout` ("ddp" or "fsdp2")."""
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}.")
    if world_size < 1:
        raise ValueError(f"`world_size` must be >= 1, got {world_size}.")
    teacher_bytes = DTYPE_BYTES[options.teacher_dtype]
    gather_bytes = DTYPE_BYTES[options.gather_dtype]
    fsdp = layout == "fsdp2"

    student = sharded_numel(models.student.all, world_size) if fsdp else models.student.numel
    shard_teacher = fsdp and options.shard_teacher
    teacher = sharded_numel(models.teacher.all, world_size) if shard_teacher else models.teacher.numel
    shard_heads = fsdp and options.shard_heads
    heads = sharded_numel(models.heads.all, world_size) if shard_heads else models.heads.numel

    comm = 0
    replicated_trainable = (0 if fsdp else models.student.numel) + (0 if shard_heads else models.heads.numel)
    if world_size > 1 and not options.ddp_bucket_view:
        comm += 4 * replicated_trainable  # DDP gradient buckets of what is replicated and trained
    if fsdp:
        comm += gather_bytes * (models.student.root_numel + 2 * models.student.largest_unit_numel)
        comm += 4 * models.student.largest_unit_numel  # one block's unsharded fp32 gradients before reduce-scatter
        if shard_teacher:
            comm += teacher_bytes * (models.teacher.root_numel + 2 * models.teacher.largest_unit_numel)
        if shard_heads:
            comm += 4 * (2 * models.heads.largest_unit_numel) + 4 * models.heads.largest_unit_numel

    items = {
        "student_params": 4 * student,
        "student_grads": 4 * student,
        "adam_states": 8 * student,
        "ema": 4 * student if options.ema else 0,
        "teacher": teacher_bytes * teacher + teacher_bytes * models.teacher.buffer_numel,
        "heads": 16 * heads + 4 * models.heads.buffer_numel,
        "comm": comm,
    }
    items["total"] = sum(items.values())
    return items


def layout_label(layout: str, options: MemoryOptions) -> str:
    if layout == "ddp":
        return "DDP"
    parts = ["teacher sharded" if options.shard_teacher else "teacher replicated"]
    if options.shard_heads:
        parts.append("heads sharded")
    return f"FSDP2 ({', '.join(parts)})"


def model_rows(models: TrainingModels, ranks, base: MemoryOptions, teacher_sharding: str) -> list[dict]:
    """One row per (layout, teacher sharding, rank count)."""
    variants = [("ddp", dataclasses.replace(base, shard_teacher=False, shard_heads=False))]
    choices = {"both": (False, True), "replicated": (False,), "sharded": (True,)}[teacher_sharding]
    variants += [("fsdp2", dataclasses.replace(base, shard_teacher=choice)) for choice in choices]
    rows = []
    for layout, options in variants:
        for world_size in ranks:
            items = memory_per_rank(models, layout, world_size, options)
            rows.append(
                dict(
                    model=models.name,
                    layout=layout,
                    label=layout_label(layout, options),
                    world_size=world_size,
                    options=dataclasses.asdict(options),
                    bytes=items,
                    gib={key: value / GIB for key, value in items.items()},
                )
            )
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows in GiB (the EMA column only when some row has one)."""
    columns = ["student params", "grads", "AdamW", "EMA", "teacher", "heads", "comm", "total"]
    keys = ["student_params", "student_grads", "adam_states", "ema", "teacher", "heads", "comm", "total"]
    if not any(row["bytes"]["ema"] for row in rows):
        columns.remove("EMA")
        keys.remove("ema")
    header = "| model | layout | ranks | " + " | ".join(columns) + " |"
    lines = [header, "| --- | --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for row in rows:
        cells = [f"{row['gib'][key]:.2f}" for key in keys]
        cells[-1] = f"**{cells[-1]}**"
        lines.append(f"| {row['model']} | {row['label']} | {row['world_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["0.6B", "1.6B", "4.8B"], help="Aliases or config keys.")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 8, 32], help="Rank counts (world sizes).")
    parser.add_argument("--teacher-dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="Frozen teacher dtype.")
    parser.add_argument(
        "--teacher-sharding",
        default="both",
        choices=("both", "replicated", "sharded"),
        help="Under FSDP2: the teacher replicated, sharded, or rows for both.",
    )
    parser.add_argument("--shard-heads", action="store_true", help="Under FSDP2, shard the heads too (per head).")
    parser.add_argument("--ema", action="store_true", help="Count an fp32 EMA of the student (`--use_ema`).")
    parser.add_argument("--gather-dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="FSDP2 param_dtype.")
    parser.add_argument("--ddp-bucket-view", action="store_true", help="DDP with gradient_as_bucket_view=True.")
    parser.add_argument("--head-block-ids", nargs="+", type=int, default=None, help="Default: spread over depth.")
    parser.add_argument("--head-channels", type=int, default=None, help="Head width (default: the inner dim).")
    parser.add_argument("--json", default=None, help="Write the configs, counts and rows here.")
    args = parser.parse_args(argv)
    for world_size in args.ranks:
        if world_size < 1:
            parser.error(f"--ranks must be >= 1, got {world_size}.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    base = MemoryOptions(
        teacher_dtype=args.teacher_dtype,
        shard_heads=args.shard_heads,
        ema=args.ema,
        gather_dtype=args.gather_dtype,
        ddp_bucket_view=args.ddp_bucket_view,
    )
    report = {"options": vars(args), "models": {}, "rows": []}
    for alias in args.models:
        key = sana_configs.resolve_model_name(alias)
        config = sana_configs.transformer_config(key)
        models = build_training_models(config, key, args.head_block_ids, args.head_channels)
        report["models"][key] = dict(
            config=config,
            source=sana_configs.CONFIG_SOURCES[key],
            student_parameters=models.student.numel,
            teacher_parameters=models.teacher.numel,
            head_parameters=models.heads.numel,
            head_buffers=models.heads.buffer_numel,
            head_block_ids=list(models.head_block_ids),
            student_largest_block=models.student.largest_unit_numel,
            student_root=models.student.root_numel,
        )
        print(
            f"{key}: student {models.student.numel / 1e9:.3f} B parameters, teacher {models.teacher.numel / 1e9:.3f} "
            f"B, {len(models.head_block_ids)} heads on blocks {list(models.head_block_ids)}: "
            f"{models.heads.numel / 1e6:.1f} M"
        )
        report["rows"] += model_rows(models, args.ranks, base, args.teacher_sharding)
    print()
    print(f"GiB per rank; teacher {args.teacher_dtype}; model states only, activations not included.")
    print(format_table(report["rows"]))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2, default=str)
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
