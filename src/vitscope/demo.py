"""``vitscope demo``: the offline showcase. Figures and a viewer page from the bundled model, no download.

The viewer page (``viewer.html``) holds every demo image, with an image picker, in one self-contained file
whose attention arrays stay within the viewer's size budget (`vitscope.viewer.BUDGET_BYTES`, shared).

The bundled ``vitscope:shapes`` model was trained on procedural shapes images (`vitscope.train.shapes`), so
the demo renders a few of those (what the model understands: its attention finds the object) next to the
bundled natural photos (which it has never seen: useful to show what an untrained-for input looks like).

The output folder follows vitscope's rule (`vitscope._io.claim_output`): one holding files vitscope did not
write is refused unless ``overwrite``, and even then none of them is replaced.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path("vitscope-demo")


def demo_images(image_size: tuple[int, int], n_shapes: int = 4) -> dict[str, Any]:
    """Name -> RGB PIL image: ``n_shapes`` procedural shapes images (validation split, seed 0, at twice the
    model's input size) then the bundled photos."""
    from importlib import resources

    from PIL import Image

    out: dict[str, Any] = {}
    try:
        from vitscope.train.shapes import SHAPE_CLASSES, render_shape
    except ImportError:  # pragma: no cover - shipped with vitscope
        pass
    else:
        size = (image_size[0] * 2, image_size[1] * 2)
        for i in range(n_shapes):
            s = render_shape(seed=0, index=i, image_size=size, split="val")
            out[f"shapes{i}-{SHAPE_CLASSES[s.label]}"] = Image.fromarray(s.image)
    folder = resources.files("vitscope") / "data" / "samples"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.lower().endswith((".jpg", ".jpeg", ".png")):
            with Image.open(Path(str(entry))) as im:
                out[Path(entry.name).stem] = im.convert("RGB")
    return out


def run_demo(
    out_dir: str | os.PathLike[str] = DEFAULT_DIR,
    model: Any = "vitscope:shapes",
    log: Callable[[str], None] | None = print,
    overwrite: bool = False,
) -> list[Path]:
    """Write the showcase figures (PNG) and one viewer page (``viewer.html``, every demo image) into ``out_dir``.

    Returns the written paths. Takes a few seconds on a laptop CPU with the bundled model. ``overwrite``:
    write into a folder that holds files vitscope did not write (they are kept, never replaced).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is as fast, and immune to oversubscribed machines
    try:
        return _run(Path(out_dir), model, log, overwrite)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, model: Any, log: Callable[[str], None] | None, overwrite: bool) -> list[Path]:
    from vitscope._io import claim_output
    from vitscope.adapters import as_vit
    from vitscope.viewer import view_many
    from vitscope.viz import save_figure
    from vitscope.viz.make import make_figure

    t0 = time.perf_counter()
    folder = claim_output(out, "demo", overwrite=overwrite)  # before the model is loaded
    vit = as_vit(model)
    images = demo_images(vit.info.preprocess.image_size)
    names = list(images)
    shapes = [n for n in names if n.startswith("shapes")]
    photos = [n for n in names if not n.startswith("shapes")]
    first = shapes[0] if shapes else names[0]
    #: file name -> (figure kind, images, keyword arguments); the viewer page last
    figures: dict[str, tuple[str, list[str], dict[str, Any]]] = {
        f"heads_{first}.png": ("heads", [first], {"mask_tau": 0.6})}
    if photos:
        figures[f"heads_{photos[0]}.png"] = ("heads", [photos[0]], {"mask_tau": 0.6})
    for n in (shapes[:2] + photos[:1]) or names[:1]:
        figures[f"panel_{n}.png"] = ("panel", [n], {})
    figures[f"layers_heads_{first}.png"] = ("grid", [first], {})
    figures["batch_rollout.png"] = ("batch", names, {"titles": names})
    figures["attention_distance.png"] = ("distance", names, {})
    figures["token_norms.png"] = ("norms", names, {})
    folder.check_writes([*figures, "viewer.html"])
    written: list[Path] = []
    for filename, (kind, chosen, kw) in figures.items():
        figure = make_figure(kind, [images[n] for n in chosen], vit, **kw)
        written.append(save_figure(figure, out / filename))
    viewer = view_many(images, vit)  # every demo image, one page with an image picker
    written.append(viewer.save(out / "viewer.html"))
    folder.record(p.name for p in written)
    if log is not None:
        log(f"vitscope demo: {vit.info.describe()}")
        for p in written:
            log(f"  {p}")
        log(f"open {out / 'viewer.html'} in a browser (works offline); took {time.perf_counter() - t0:.1f} s")
    return written
