"""What a finished batch shows at a glance: a contact sheet of every job's first image with its parameters, and,
when the batch has references, each job's error against its reference image versus its run time."""
import io
from collections import defaultdict
from pathlib import Path

import numpy as np


def _load(path):
    from PIL import Image
    with Image.open(path) as image:
        return image.convert("RGB")


def contact_sheet(out_dir, records, storage, columns=8, cell=96):
    """contact_sheet.png: one cell per done job (its first image, labelled with its parameters); None if no image."""
    from PIL import Image, ImageDraw
    out_dir = Path(out_dir)
    done = [r for r in records if r["status"] == "done" and r["images"]]
    if not done:
        return None
    label_h = 24
    rows = (len(done) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, record in enumerate(done):
        x, y = (i % columns) * cell, (i // columns) * (cell + label_h)
        sheet.paste(_load(out_dir / record["images"][0]).resize((cell, cell), Image.NEAREST), (x, y))
        label = " ".join(f"{v}" for v in record["params"].values()) or record["job_id"]
        draw.text((x + 2, y + cell + 1), label[:16], fill="black")
        draw.text((x + 2, y + cell + 12), label[16:32], fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    storage.write_bytes(out_dir / "contact_sheet.png", buffer.getvalue())
    return out_dir / "contact_sheet.png"


def image_rmse(paths_a, paths_b):
    """RMS difference over all images of two jobs, pixel values in [0, 1]."""
    a = np.stack([np.asarray(_load(p), dtype=np.float64) / 255.0 for p in paths_a])
    b = np.stack([np.asarray(_load(p), dtype=np.float64) / 255.0 for p in paths_b])
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    return float(np.sqrt(np.mean((a - b) ** 2)))


def compare_with_references(out_dir, records):
    """Sets `rmse_vs_reference` on every done job whose reference is done too."""
    out_dir = Path(out_dir)
    by_id = {r["job_id"]: r for r in records}
    for record in records:
        ref = by_id.get(record.get("reference_id"))
        if record["status"] == "done" and ref and ref["status"] == "done" and record["role"] == "job":
            try:
                record["rmse_vs_reference"] = round(image_rmse([out_dir / p for p in record["images"]],
                                                               [out_dir / p for p in ref["images"]]), 6)
            except ValueError as e:
                record["rmse_vs_reference"] = None
                record["error"] = f"not compared with the reference: {e}"


def speed_vs_quality(out_dir, records, storage):
    """speed_vs_quality.png: mean run time vs mean RMSE to the reference per parameter setting (seeds averaged)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = defaultdict(list)
    for r in records:
        if r.get("rmse_vs_reference") is not None and r["run_s"] is not None:
            label = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k not in ("seed", "noise_seed")
                              and not k.endswith((".seed", ".noise_seed")))
            groups[label or "workflow"].append((r["run_s"], r["rmse_vs_reference"], r["nfe"]))
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, points in sorted(groups.items()):
        t, e = np.mean([p[0] for p in points]), np.mean([p[1] for p in points])
        ax.scatter([t], [e])
        ax.annotate(label, (t, e), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("run time per job on the server (s)")
    ax.set_ylabel("RMSE vs reference image (pixels in [0, 1])")
    ax.set_title("speed vs quality (mean over seeds)")
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(Path(out_dir) / "speed_vs_quality.png", buffer.getvalue())
    return Path(out_dir) / "speed_vs_quality.png"
