"""Preprocessing against timm's eval transform on real images; image folders and sampling."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crossvit_edge.data import open_image_set
from crossvit_edge.errors import UserError
from crossvit_edge.preprocess import Preprocessing

timm = pytest.importorskip("timm")


def _real_images(digits_dir):
    """Real photographs ship with scikit-learn (china.jpg, flower.jpg); digits are real too."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    digits = [Image.open(p) for p in sorted((digits_dir / "val").rglob("*.png"))[:3]]
    return photos + digits


@pytest.mark.parametrize("name", ["crossvit_9_240", "crossvit_15_dagger_408"])
def test_matches_timm_eval_transform(name, digits_dir):
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(name, pretrained=False)
    cfg = resolve_data_config({}, model=model)
    ref_tf = create_transform(**cfg)
    ours = Preprocessing(input_size=cfg["input_size"][1], crop_pct=cfg["crop_pct"])
    assert ours.resize_size == int(cfg["input_size"][1] / cfg["crop_pct"])
    std = np.asarray(ours.std, np.float32)[:, None, None]
    for im in _real_images(digits_dir):
        ref = ref_tf(im.convert("RGB")).numpy()
        got = ours(im)
        assert got.shape == ref.shape
        # compare in pixel units: within 1/255 per pixel
        assert np.abs((got - ref) * std).max() <= 1.0 / 255 + 1e-6


def test_grayscale_and_rgba_become_rgb():
    pre = Preprocessing()
    gray = Image.fromarray(np.full((300, 320), 128, np.uint8), "L")
    rgba = Image.fromarray(np.full((300, 320, 4), 128, np.uint8), "RGBA")
    for im in (gray, rgba):
        x = pre(im)
        assert x.shape == (3, 240, 240) and x.dtype == np.float32
        assert np.allclose(x[:, 0, 0] * np.asarray(pre.std) + np.asarray(pre.mean), 128 / 255, atol=1e-6)


def test_image_folder_labels_sampling_and_bad_files(digits_dir, tmp_path, caplog):
    s = open_image_set(digits_dir / "val")
    assert len(s) == 360 and s.classes == [str(i) for i in range(10)]
    a, b = s.sample(50, seed=1), s.sample(50, seed=1)
    assert a.paths == b.paths  # deterministic
    counts = np.bincount(a.labels, minlength=10)
    assert counts.min() == 5 and counts.max() == 5  # class-balanced
    assert s.sample(50, seed=2).paths != a.paths
    with pytest.raises(UserError, match="asked for 1000 images but it holds only 360"):
        s.sample(1000)
    # a plain folder with one broken and one non-image file
    plain = tmp_path / "plain"
    plain.mkdir()
    for p in s.paths[:3]:
        (plain / p.name).write_bytes(p.read_bytes())
    (plain / "broken.png").write_bytes(b"\x89PNG not really")
    (plain / "notes.txt").write_text("hello")
    with caplog.at_level("WARNING"):
        ps = open_image_set(plain)
    assert len(ps) == 3 and not ps.has_labels
    assert "skipped 1 file(s)" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no decodable images"):
        open_image_set(empty)
    with pytest.raises(UserError, match="image folder not found"):
        open_image_set(tmp_path / "nope")
    assert s.sha256() == open_image_set(digits_dir / "val").sha256()


# EXIF orientation is never applied: the same stored pixels give the same tensor whatever the tag says
ORIENTED_FORMATS = {
    "jpeg": ("JPEG", {"quality": 95, "subsampling": 0}),
    "tiff": ("TIFF", {}),
    "tiff-lzw": ("TIFF", {"compression": "tiff_lzw"}),  # libtiff's path in Pillow
    "png-exif": ("PNG", {}),  # the eXIf chunk
    "webp": ("WEBP", {"lossless": True}),
}


def encode_with_orientation(pixels: np.ndarray, fmt: str, options: dict, orientation) -> bytes:
    import io

    kw = dict(options)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **kw)
    return out.getvalue()


@pytest.mark.parametrize("name", sorted(ORIENTED_FORMATS))
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_never_applied(name, orientation):
    import io

    from crossvit_edge.preprocess import load_image

    fmt, options = ORIENTED_FORMATS[name]
    pixels = np.random.default_rng(orientation).integers(0, 256, (30, 52, 3), dtype=np.uint8)  # not square: a rotation shows
    tagged = encode_with_orientation(pixels, fmt, options, orientation)
    plain = encode_with_orientation(pixels, fmt, options, None)
    assert Image.open(io.BytesIO(tagged)).getexif().get(0x0112) == orientation, "the file carries the tag"
    got, reference = np.asarray(load_image(tagged).convert("RGB")), np.asarray(load_image(plain).convert("RGB"))
    assert got.shape == pixels.shape and np.array_equal(got, reference), name
    if fmt != "JPEG":
        assert np.array_equal(got, pixels)
    pre = Preprocessing()
    np.testing.assert_array_equal(pre(load_image(tagged)), pre(load_image(plain)))


def test_undecoded_pil_tiff_passed_to_the_runtime_keeps_its_stored_pixels(tmp_path):
    """A TIFF the app opened with Pillow but did not decode is decoded by the runtime like a file."""
    import io

    from crossvit_edge.runtime import _as_pil

    pixels = np.random.default_rng(1).integers(0, 256, (30, 52, 3), dtype=np.uint8)
    opened = Image.open(io.BytesIO(encode_with_orientation(pixels, "TIFF", {}, 6)))
    assert np.array_equal(np.asarray(_as_pil(opened).convert("RGB")), pixels)
