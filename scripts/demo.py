"""The README's main job: a shipped workflow executed by the real ComfyUI host through its HTTP API, on the
embedded digit model (no download). Writes the images under out/demo/ and prints where they are.
usage: make demo   (or: .host/venv/bin/python scripts/demo.py [WORKFLOW_API_JSON])"""
import sys
import time
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR))

from testbed.host import HOST_DIR, Client, Server, api_workflow_path, load_api_workflow, prepare_base  # noqa: E402

DEFAULT_WORKFLOW = api_workflow_path("digits_fast_sampling")


def contact_sheet(paths, target, columns=10, scale=4):
    """All images of the run on one sheet (nearest-neighbour upscaled), for a quick look."""
    from PIL import Image
    images = [Image.open(p).convert("RGB") for p in paths]
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST).save(target)
    return target


def main(argv):
    workflow_path = Path(argv[0]) if argv else DEFAULT_WORKFLOW
    out_dir = PACK_DIR / "out" / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = prepare_base(HOST_DIR / "demobase")
    server = Server(base, HOST_DIR / "demo-server.log").start()
    print(f"ComfyUI up at http://{server.address} in {time.time() - t0:.1f} s (log: {server.log_path})")
    try:
        client = Client(server.address)
        result = client.run(load_api_workflow(workflow_path))
        if result.status != "success":
            print(f"workflow {workflow_path.name} ended {result.status}: {result.error()}")
            return 1
        steps = result.progress()
        print(f"ran {workflow_path.name} in {result.wall_s:.1f} s ({len(steps)} progress events)")
        written = []
        for node_id, output in result.outputs.items():
            for image in output.get("images", []):
                target = out_dir / image["filename"]
                target.write_bytes(client.view(image["filename"], image.get("subfolder", ""), image["type"]))
                written.append(target)
        for path in written:
            print("image:", path)
        if written:
            print("contact sheet:", contact_sheet(written, out_dir / "contact_sheet.png"))
        print(f"{len(written)} image(s) in {out_dir}; total {time.time() - t0:.1f} s")
        return 0 if written else 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
