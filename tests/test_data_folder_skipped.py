"""Issue 15: ``sparse-dit data folder`` drops nothing without a name.

Ten files in, as the issue found them: seven good videos, one truncated, one too short, one
missing from ``captions.jsonl``. Seven rows come out, and each of the other three is named with
its reason in the command's output and in ``skipped.jsonl`` beside the dataset. The videos are
real H.264 files made by imageio-ffmpeg's ffmpeg.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest


def _mp4(path: Path, frames: int) -> Path:
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=16x16:rate=8",
                    "-frames:v", str(frames), "-pix_fmt", "yuv420p", "-c:v", "libx264", "-g", "4", "-movflags", "+faststart", str(path)],
                   check=True, timeout=60)
    return path


def test_every_skipped_file_is_named_with_its_reason_in_the_output_and_skipped_jsonl(tmp_path, capsys):
    import datasets

    from sparse_dit.cli import main

    src = tmp_path / "clips"
    src.mkdir()
    good = _mp4(tmp_path / "good.mp4", 12)
    for i in range(7):
        shutil.copy(good, src / f"good{i}.mp4")
    shutil.copy(good, src / "uncaptioned.mp4")  # a fine video that captions.jsonl forgot
    data = good.read_bytes()
    (src / "broken.mp4").write_bytes(data[: len(data) // 2])  # declares 12 frames, holds fewer
    _mp4(src / "short.mp4", 3)  # 3 frames; the clips are 8
    listed = [f"good{i}.mp4" for i in range(7)] + ["broken.mp4", "short.mp4"]
    (src / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": f"clip {f}"}) + "\n" for f in listed))
    assert len([p for p in src.iterdir() if p.suffix == ".mp4"]) == 10

    out = tmp_path / "ds"
    rc = main(["data", "folder", "--videos", str(src), "--out", str(out), "--frames", "8", "--resolution", "16x16",
               "--workers", "0", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    ds = datasets.load_from_disk(str(out))
    assert sorted(ds["source"]) == [f"good{i}.mp4" for i in range(7)]  # 10 in, 7 written

    want = {"broken.mp4": "undecodable", "short.mp4": "too short", "uncaptioned.mp4": "missing caption"}
    rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {r["file"]: r["reason"] for r in rows} == want and len(rows) == 3
    assert all(r["detail"] for r in rows)
    assert "Error" in next(r["detail"] for r in rows if r["file"] == "broken.mp4")  # what PyAV said
    assert "3 frame(s)" in next(r["detail"] for r in rows if r["file"] == "short.mp4")
    assert "skipped 1 undecodable, 1 too-short and 1 uncaptioned file(s)" in printed and str(out / "skipped.jsonl") in printed
    for name, reason in want.items():  # each named on its own line with its reason
        assert any(line.strip().startswith(f"skipped {name}:") and line.endswith(f"[{reason}]") for line in printed.splitlines()), printed
    assert len(ds) + len(rows) == 10  # nothing unaccounted for
    assert not list(out.glob(".*.tmp"))


def test_a_clean_folder_writes_an_empty_skipped_jsonl(tmp_path, capsys):
    from sparse_dit.cli import main

    src = tmp_path / "clips"
    src.mkdir()
    _mp4(src / "a.mp4", 8)
    out = tmp_path / "ds"
    assert main(["data", "folder", "--videos", str(src), "--out", str(out), "--frames", "8", "--workers", "0", "--no-progress"]) == 0
    assert (out / "skipped.jsonl").read_text() == "" and "skipped 0 undecodable, 0 too-short and 0 uncaptioned" in capsys.readouterr().out
