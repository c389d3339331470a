"""Opening images: one function, one wording of why an image cannot be used."""

import pytest

from orchestrator import images


def test_load_image_says_why(tmp_path):
    with pytest.raises(images.ImageLoadError, match="file not found"):
        images.load_image(str(tmp_path / "nope.jpg"))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    assert images.image_error(str(tmp_path / "bad.jpg")).startswith("unreadable image")
