"""The `sglang generate` command that serves an FP8 checkpoint fp8cookbook wrote.

SGLang's own FP8 diffusion examples are the source of the flags: DiT offload off for FP8 (offload loses the
column-major FP8 weight view), the family's parallelism (`Family.sglang_extra_flags`) and the memory flags that make
the model fit one 80 GB GPU (`Family.sglang_memory_flags`).
"""

from __future__ import annotations

import os
import shlex

from .errors import Fp8CookbookError
from .families import Family, get_family


def sglang_command(family: str | Family, model_path: str | os.PathLike,
                   checkpoints: dict[str, str | os.PathLike] | None, *,
                   prompt: str, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                   steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
                   output_path: str | os.PathLike | None = None) -> str:
    """The `sglang generate` command that serves `checkpoints` ({"transformer": dir[, "transformer_2": dir]}) on top
    of the base pipeline `model_path`, one flag group per line.

    FP8 transformers need `--dit-cpu-offload false --dit-layerwise-offload false` (offload loses the column-major FP8
    weight view); Wan2.2 A14B gets its second expert through `--transformer-2-path` and runs on 4 GPUs with
    Ulysses sequence parallelism. `checkpoints` None: `model_path` is a full repo that holds the FP8 transformers
    in its component folders (`quantize --full-repo`, NVIDIA's whole-pipeline repos), served with no path flags.
    """
    fam = get_family(family) if isinstance(family, str) else family
    if checkpoints is not None:
        unknown = sorted(set(checkpoints) - set(fam.experts))
        if unknown or "transformer" not in checkpoints:
            raise Fp8CookbookError(f"{fam.title} checkpoints are {', '.join(fam.experts)}; got "
                                   f"{', '.join(checkpoints)}")
    q = shlex.quote
    parts = [f"sglang generate --model-path {q(str(model_path))}"]
    if checkpoints is not None:
        parts.append(f"--transformer-path {q(str(checkpoints['transformer']))}")
        if "transformer_2" in checkpoints:
            parts.append(f"--transformer-2-path {q(str(checkpoints['transformer_2']))}")
    if fam.sglang_extra_flags:
        parts.append(" ".join(fam.sglang_extra_flags))
    parts.append(" ".join(("--dit-cpu-offload false", "--dit-layerwise-offload false") + fam.sglang_memory_flags))
    parts.append(f"--prompt {q(prompt)}")
    size = []
    if width is not None and height is not None:
        size.append(f"--width {int(width)} --height {int(height)}")
    if fam.is_video and num_frames is not None:
        size.append(f"--num-frames {int(num_frames)}")
    if steps is not None:
        size.append(f"--num-inference-steps {int(steps)}")
    if guidance_scale is not None:
        size.append(f"--guidance-scale {guidance_scale:g}")
    if seed is not None:
        size.append(f"--seed {int(seed)}")
    if size:
        parts.append(" ".join(size))
    parts.append("--save-output" + (f" --output-path {q(str(output_path))}" if output_path is not None else ""))
    return " \\\n  ".join(parts)
