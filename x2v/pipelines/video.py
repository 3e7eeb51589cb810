"""Video frames in and out: uint8 conversion as the official writer does it, H.264 mp4 through PyAV."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[3, F, H, W]`` in [-1, 1] -> ``[F, H, W, 3]`` uint8: (x + 1) / 2 * 255, truncated like the official writer."""
    scaled = (video.float().clamp(-1, 1) + 1) / 2 * 255
    return scaled.permute(1, 2, 3, 0).to(torch.uint8).cpu().numpy()


def write_mp4(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """H.264 (yuv420p) mp4 at ``fps``; written to a temp file in the same folder and renamed when complete."""
    import av

    path = Path(path)
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
