"""Aspect-ratio bins for resolution binning at any base resolution."""

from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN


_DIFFUSERS_BINS = {
    256: ASPECT_RATIO_256_BIN,
    512: ASPECT_RATIO_512_BIN,
    1024: ASPECT_RATIO_1024_BIN,
    2048: ASPECT_RATIO_2048_BIN,
    4096: ASPECT_RATIO_4096_BIN,
}


def aspect_ratio_bins(base_size: int, multiple_of: int) -> dict[str, list[float]]:
    """
    `{aspect_ratio: [height, width]}` bins of about `base_size**2` pixels, heights and widths multiples of
    `multiple_of` (pixels per latent token).

    diffusers' own tables are used for the sizes it ships (256 to 4096 px), so released models bin exactly as with
    diffusers; other sizes scale the 1024 px table and round to `multiple_of`.
    """
    if base_size in _DIFFUSERS_BINS and all(
        int(h) % multiple_of == 0 and int(w) % multiple_of == 0 for h, w in _DIFFUSERS_BINS[base_size].values()
    ):
        return _DIFFUSERS_BINS[base_size]
    scale = base_size / 1024
    bins = {}
    for ratio, (height, width) in ASPECT_RATIO_1024_BIN.items():
        bins[ratio] = [
            float(max(multiple_of, round(height * scale / multiple_of) * multiple_of)),
            float(max(multiple_of, round(width * scale / multiple_of) * multiple_of)),
        ]
    return bins
