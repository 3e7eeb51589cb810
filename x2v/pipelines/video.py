"""Video frames in and out: uint8 conversion as the official writer does it, H.264 mp4 through PyAV."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from x2v.errors import ConfigError, X2VError


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[3, F, H, W]`` in [-1, 1] -> ``[F, H, W, 3]`` uint8: (x + 1) / 2 * 255, truncated like the official writer."""
    scaled = (video.float().clamp(-1, 1) + 1) / 2 * 255
    return scaled.permute(1, 2, 3, 0).to(torch.uint8).cpu().numpy()


# H.264 at crf 17 stores a generated video in well under a tenth of its raw bytes; asking for that much free space
# before the compute catches a full disk without refusing a tight one.
MP4_FRACTION = 10


def check_output_path(path: str | Path, frames: int, height: int, width: int) -> Path:
    """Refuse, before any compute, an mp4 path that cannot be written: an existing folder, a parent that is a file
    or not writable, a disk without room for the video."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"save_result_path {path} is a folder; name an .mp4 file, e.g. {path / 'output.mp4'}")
    existing = next(folder for folder in (path.parent, *path.parent.parents) if folder.exists())
    if not existing.is_dir():
        raise ConfigError(f"save_result_path {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"save_result_path {path}: cannot write in {existing} (permission denied); choose another "
                          "folder")
    needed, free = frames * height * width * 3 // MP4_FRACTION, shutil.disk_usage(existing).free
    if free < needed:
        raise ConfigError(f"save_result_path {path}: {existing} has {free / 2**20:.1f} MiB free, the video needs "
                          f"about {needed / 2**20:.1f} MiB; free some space or choose another folder")
    return path


def write_mp4(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """H.264 (yuv420p) mp4 at ``fps``; written to a temp file in the same folder and renamed when complete. If it
    cannot be written (a full disk...), the frames are kept in a ``.npy`` file and the error names it."""
    path = Path(path)
    try:
        return _write_mp4(frames, path, fps)
    except OSError as e:
        raise X2VError(f"{path}: the video could not be written ({e.strerror or e}); {keep_frames(frames, path)}"
                       ) from None


def keep_frames(frames: np.ndarray, path: Path) -> str:
    """Save the frames of a video that could not be written, next to it or else in the temp folder; says where."""
    for kept in (path.with_name(f"{path.stem}.frames.npy"), Path(tempfile.gettempdir()) / f"{path.stem}.frames.npy"):
        try:
            np.save(kept, frames)
            return f"its frames are kept in {kept} (uint8 [frames, height, width, 3], numpy.load)"
        except OSError:
            kept.unlink(missing_ok=True)
    return "its frames could not be kept either"


def _write_mp4(frames: np.ndarray, path: Path, fps: int) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".mp4", dir=path.parent)
    os.close(fd)
    try:
        with av.open(tmp, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "17"}  # visually lossless; the official writer uses imageio quality 8
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            container.mux(stream.encode())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; the video is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """Frames ``[F, H, W, 3]`` uint8 and the frame rate of a video file."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


def load_image(image) -> torch.Tensor:
    """A path, PIL image, uint8 array ``[H, W, 3]`` or tensor ``[3, H, W]`` in [-1, 1] -> float32 ``[3, H, W]`` in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        return image.float()
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as img:
            image = img.convert("RGB")
    # A fresh writable array: PIL's buffer and a caller's array are read-only to torch.
    pixels = np.array(image if isinstance(image, np.ndarray) else image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1


def load_video(video) -> torch.Tensor:
    """An mp4 path or a ``[3, F, H, W]`` tensor in [-1, 1] -> float32 ``[3, F, H, W]`` in [-1, 1]."""
    if isinstance(video, torch.Tensor):
        return video.float()
    frames, _ = read_mp4(video)
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


def load_mask(mask) -> torch.Tensor:
    """A mask video (white = generate) or ``[F, H, W]`` tensor -> float32 ``[F, H, W]`` of 0/1."""
    if isinstance(mask, torch.Tensor):
        return mask.float()
    return (load_video(mask).mean(0) > 0).float()
