"""Keeps torch.compile's on-disk caches from serving graphs compiled against another build of
this library.

Inductor's FX-graph cache and AOTAutograd's cache key a graph on Dynamo's view of it, where our
ops are single nodes: the Python body that AOTAutograd traces through (`ops.py` and `_op/`, the Triton
launchers, the plain maths small CPU calls compile to) is not in the key, so after an upgrade or
an edit a warm cache would run the old code (seen: a changed body still compiled to the old
kernel call). Importing `fire_repair` adds a hash of those sources to
`torch.compiler.config.cache_key_tag`, which both keys include; the user's own tag is kept."""
import hashlib
from pathlib import Path

import torch

import fire_kernels

_HERE = Path(__file__).resolve().parent
# what torch.compile traces through when it compiles our ops
TRACED_SOURCES = [_HERE / "ops.py", *sorted((_HERE / "_op").glob("*.py")), _HERE / "reference.py",
                  *sorted(Path(fire_kernels.__file__).resolve().parent.glob("*.py"))]


def source_tag(paths=TRACED_SOURCES) -> str:
    """'fire-kernels:' and the first 16 hex digits of the SHA-256 of the files' bytes."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
    return f"fire-kernels:{h.hexdigest()[:16]}"


def tag_compile_caches(tag=None) -> str:
    """Appends `tag` (default: `source_tag()`) to torch.compiler.config.cache_key_tag, once."""
    tag = tag or source_tag()
    current = getattr(torch.compiler.config, "cache_key_tag", None)
    if current is None:  # a torch without the setting: nothing to add the tag to
        return tag
    if tag not in current.split(","):
        torch.compiler.config.cache_key_tag = f"{current},{tag}" if current else tag
    return tag
