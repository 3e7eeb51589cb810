"""What a client may send: the video request (LightX2V's fields and x2v's sampling keys) and the service's limits.

Every field is optional and has no default of its own: a field left out takes the server's config value
(docs/pitfalls.md F02: LightX2V's schema default ``infer_steps = 5`` silently replaced the config's). The limits
(steps, frames, sizes) are the service's (``--max_steps`` ...), given to the validation as its context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# A file name the client may choose (save_result_path, lora_name, task ids): no folders, no "..".
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,199}")
TASK_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
FILE_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; ``x2v serve --max_steps`` & co."""

    max_steps: int = 100
    max_frames: int = 241
    max_size: int = 1920
    size_multiple: int = 16  # 32 for Wan2.2 TI2V-5B
    max_prompt_chars: int = 10_000
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = 4096 * 4096


def file_name(value: str, what: str, suffixes: tuple[str, ...]) -> str:
    """``value`` as a bare file name (a leading ``./`` is dropped, as LightX2V's clients write it), or ValueError."""
    name = value[2:] if value.startswith("./") else value
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} must be a file name (letters, digits, _ . - and spaces), not a path: got {value!r}")
    if not name.lower().endswith(suffixes):
        raise ValueError(f"{what} must end in {' or '.join(suffixes)}: got {value!r}")
    return name


class VideoRequest(BaseModel):
    """``POST /v1/tasks/video``. Unknown fields are refused (a misspelt field must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    negative_prompt: str | None = None
    image_path: str | None = Field(None, description="base64 image, or a file_id from /v1/files/upload")
    last_frame_path: str | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    infer_steps: int | None = None
    target_video_length: int | None = None
    target_height: int | None = None
    target_width: int | None = None
    sample_guide_scale: float | None = Field(None, ge=0, le=50)
    sample_shift: float | None = Field(None, ge=0, le=100)
    enable_cfg: bool | None = None
    fps: int | None = Field(None, ge=1, le=120)
    save_result_path: str | None = None
    lora_name: str | None = None
    lora_strength: float | None = Field(None, ge=-100, le=100)
    task_id: str | None = None
    # LightX2V's fields x2v takes but does not act on (its clients send them)
    use_prompt_enhancer: bool | None = None
    reuse: bool | None = None
    presigned_url: str | None = None
    target_shape: list[int] | None = None

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _text(cls, value: str | None, info: ValidationInfo) -> str | None:
        limit = limits_of(info).max_prompt_chars
        if value is not None and len(value) > limit:
            raise ValueError(f"at most {limit} characters, got {len(value)}")
        return value

    @field_validator("infer_steps")
    @classmethod
    def _steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = limits_of(info).max_steps
        if value is not None and not 1 <= value <= limit:
            raise ValueError(f"infer_steps must be 1 ... {limit} (this service's --max_steps), got {value}")
        return value

    @field_validator("target_video_length")
    @classmethod
    def _frames(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = limits_of(info).max_frames
        if value is not None and (not 1 <= value <= limit or value % 4 != 1):
            raise ValueError(f"target_video_length must be 4k+1 frames (1, 5, 9, ..., 81, ...) and at most {limit} "
                             f"(this service's --max_frames), got {value}")
        return value

    @field_validator("target_height", "target_width")
    @classmethod
    def _size(cls, value: int | None, info: ValidationInfo) -> int | None:
        return check_size(value, info.field_name, limits_of(info))

    @field_validator("save_result_path")
    @classmethod
    def _result_name(cls, value: str | None) -> str | None:
        return None if value in (None, "") else file_name(value, "save_result_path", (".mp4",))

    @field_validator("lora_name")
    @classmethod
    def _lora_name(cls, value: str | None) -> str | None:
        return None if value in (None, "") else file_name(value, "lora_name", (".safetensors",))

    @field_validator("task_id")
    @classmethod
    def _task_id(cls, value: str | None) -> str | None:
        if value is not None and not TASK_ID.fullmatch(value):
            raise ValueError(f"task_id must be 1 to 64 of A-Z a-z 0-9 _ -, got {value!r}")
        return value

    @field_validator("use_prompt_enhancer")
    @classmethod
    def _no_enhancer(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("prompt enhancement is not implemented in x2v; send false or leave it out")
        return value

    @field_validator("presigned_url")
    @classmethod
    def _no_upload_url(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("x2v does not upload results to URLs; fetch them from /v1/tasks/{id}/result")
        return value

    @field_validator("target_shape")
    @classmethod
    def _shape(cls, value: list[int] | None) -> list[int] | None:
        if value not in (None, []) and len(value) != 2:
            raise ValueError(f"target_shape is [] or [height, width], got {value}")
        return value

    @model_validator(mode="after")
    def _shape_as_size(self, info: ValidationInfo) -> VideoRequest:
        if self.target_shape:  # LightX2V's [height, width]
            for name, value in zip(("target_height", "target_width"), self.target_shape):
                if getattr(self, name) is None:
                    setattr(self, name, check_size(value, f"target_shape's {name}", limits_of(info)))
        return self


def check_size(value: int | None, name: str, limits: Limits) -> int | None:
    multiple = limits.size_multiple
    if value is not None and (not multiple <= value <= limits.max_size or value % multiple):
        raise ValueError(f"{name} must be a multiple of {multiple} from {multiple} to {limits.max_size} "
                         f"(this service's --max_size), got {value}")
    return value


def limits_of(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


# Request fields that are not generate() settings: handled by the service itself.
SERVICE_FIELDS = ("image_path", "last_frame_path", "save_result_path", "lora_name", "lora_strength", "task_id",
                  "use_prompt_enhancer", "reuse", "presigned_url", "target_shape")

# Requests that agree on these run as one batch (the pipeline splits a batch further where latent shapes differ).
BATCH_FIELDS = ("infer_steps", "target_video_length", "target_height", "target_width", "sample_shift", "enable_cfg",
                "lora_name", "lora_strength")


def batch_key(request: dict[str, Any]) -> str:
    """Equal keys: the requests can be denoised together."""
    parts = [f"{name}={request.get(name)!r}" for name in BATCH_FIELDS]
    parts += [f"{name}={bool(request.get(name))}" for name in ("image_path", "last_frame_path")]
    return ";".join(parts)
