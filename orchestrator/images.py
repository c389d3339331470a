"""Opening images: every stage opens an image the same way and says the same thing when it cannot.

The bottom layer (PIL only). A missing or corrupt image is never an exception deep inside a worker: the
readers count it as a reject (`data.datasets`), the evaluation turns it into an error row, the training
collator skips the row; all of them through `load_image` / `image_error`, so the reason reads alike.
"""

from __future__ import annotations

from PIL import Image


class ImageLoadError(OSError):
    """An image that cannot be used: the message names the path and the reason."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def load_image(path: str) -> Image.Image:
    """Open and fully decode an image as RGB, or raise ImageLoadError saying why not."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except Exception as error:  # PIL raises many types for corrupt files; all mean "unusable"
        raise ImageLoadError(path, f"unreadable image ({type(error).__name__}: {error})") from None


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding it, or ImageLoadError saying why not."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except Exception as error:
        raise ImageLoadError(path, f"unreadable image ({type(error).__name__}: {error})") from None


def image_error(path: str) -> str:
    """'' if the image opens and decodes, else the reason."""
    try:
        load_image(path)
        return ""
    except ImageLoadError as error:
        return error.reason
