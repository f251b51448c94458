"""Dreambooth data: image modes, captions, bad files, preprocessing, resumable batches, class images."""

import sys

import numpy as np
import pytest
from PIL import Image

from sd_jax.dreambooth.data import (
    Concept, DreamboothDataset, class_images_from_tfds, ensure_class_images, list_images, load_class_images,
    load_instance_images, preprocess,
)

R = 32


def _gradient(w, h, seed=0):
    """A (h, w, 3) uint8 image with structure (so crops and flips are visible)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), rng.integers(0, 256, (h, w))], -1)
    return arr.astype(np.uint8)


def _folder(path, n, size=(40, 48), seed=0):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_gradient(*size, seed=seed + i)).save(path / f"img{i:02d}.png")
    return path


def test_every_mode_and_format_loads_as_rgb(tmp_path):
    d = tmp_path / "inst"
    d.mkdir()
    rgb = Image.fromarray(_gradient(40, 30))
    rgb.save(d / "a_rgb.png")
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(d / "b_rgba.png")
    rgb.convert("L").save(d / "c_l.png")
    rgb.convert("P").save(d / "d_p.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(d / "e_cmyk.jpg")  # CMYK JPEG: red
    Image.fromarray(np.full((10, 12), 65535, np.uint16)).save(d / "f_16bit.png")
    assert Image.open(d / "f_16bit.png").mode.startswith("I")
    rgb.save(d / "g.webp")
    rgb.save(d / "h.bmp")
    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 0, 255), (0, 255, 0))]
    frames[0].save(d / "i.gif", save_all=True, append_images=frames[1:])
    rgb.save(d / "j.tiff")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(d / "k_cmyk.tif")
    # EXIF orientation 6 (rotate 90 clockwise to display): left half red, right half blue, 40 wide x 20 high
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(d / "l_exif.jpg", exif=exif, quality=95)
    (d / "notes.md").write_text("not an image")

    ex = {e.path.name: e for e in load_instance_images(Concept(str(d), "a photo of sks dog"))}
    assert [e for e in ex] == sorted(ex) and len(ex) == 12
    assert all(e.image.mode == "RGB" and e.prompt == "a photo of sks dog" for e in ex.values())
    assert np.asarray(ex["b_rgba.png"].image).min() == 255  # transparency over white
    assert abs(np.asarray(ex["e_cmyk.jpg"].image).astype(int) - (255, 0, 0)).max() < 8
    assert abs(np.asarray(ex["k_cmyk.tif"].image).astype(int) - (255, 0, 0)).max() < 2
    assert np.asarray(ex["f_16bit.png"].image).min() == 255
    assert np.asarray(ex["i.gif"].image)[0, 0].tolist() == [0, 0, 255]  # first frame
    rot = np.asarray(ex["l_exif.jpg"].image).astype(int)
    assert rot.shape == (40, 20, 3)  # rotated: 20 wide x 40 high
    assert rot[5, 10, 0] > 200 and rot[5, 10, 2] < 60  # top (was left) is red
    assert rot[35, 10, 2] > 200 and rot[35, 10, 0] < 60  # bottom (was right) is blue


def test_captions_override_the_instance_prompt(tmp_path):
    d = _folder(tmp_path / "inst", 3)
    (d / "img01.txt").write_text("a photo of sks dog on the grass\n")
    ex = load_instance_images(Concept(d, "a photo of sks dog"))
    assert [e.prompt for e in ex] == ["a photo of sks dog", "a photo of sks dog on the grass", "a photo of sks dog"]
    (d / "img02.txt").write_text("  \n")
    with pytest.raises(ValueError, match="img02.txt"):
        load_instance_images(Concept(d, "a photo of sks dog"))


def test_bad_file_is_an_error_or_a_skip(tmp_path):
    d = _folder(tmp_path / "inst", 2)
    (d / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    concept = Concept(d, "a photo of sks dog")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_instance_images(concept)
    with pytest.warns(UserWarning, match="broken.jpg"):
        ex = load_instance_images(concept, skip_bad=True)
    assert [e.path.name for e in ex] == ["img00.png", "img01.png"]


def test_concept_validation(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "caption.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty.*holds no images.*\.jpg.*\.png"):
        Concept(empty, "a photo of sks dog")
    with pytest.raises(ValueError, match="not an existing folder"):
        Concept(tmp_path / "missing", "a photo of sks dog")
    d = _folder(tmp_path / "inst", 1)
    with pytest.raises(ValueError, match="needs a class_dir"):
        Concept(d, "a photo of sks dog", class_prompt="a photo of dog")
    with pytest.raises(ValueError, match="needs a class_prompt"):
        Concept(d, "a photo of sks dog", class_dir=str(tmp_path / "cls"))
    with pytest.raises(ValueError, match="num_class_images"):
        Concept(d, "a photo of sks dog", "a photo of dog", str(tmp_path / "cls"), num_class_images=0)
    with pytest.raises(ValueError, match="instance_prompt"):
        Concept(d, "")
    c = Concept(d, "p")
    assert isinstance(c.instance_dir, str) and not c.with_prior
    # too few class images for the dataset: a clear pointer to ensure_class_images
    c = Concept(d, "a photo of sks dog", "a photo of dog", str(_folder(tmp_path / "cls", 2)), num_class_images=3)
    with pytest.raises(ValueError, match="2 readable image.*3 asked.*ensure_class_images"):
        load_class_images(c)


def test_preprocess_shapes_ranges_and_crops():
    img = Image.fromarray(_gradient(64, 48))  # 64 wide, 48 high -> 42x32 after resize
    out = preprocess(img, R, "center", None)
    assert out.shape == (R, R, 3) and out.dtype == np.float32
    assert -1.0 <= out.min() and out.max() <= 1.0
    resized = np.asarray(img.resize((42, 32), Image.BILINEAR)).astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(out, resized[:, 5:37])  # round((42 - 32) / 2) = 5
    crops = {preprocess(img, R, "random", np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(crops) > 1
    assert preprocess(Image.new("RGB", (9, 40), "white"), 16).min() == 1.0  # upscaled, tall
    assert preprocess(Image.new("L", (50, 50), 0), 16).max() == -1.0
    with pytest.raises(ValueError, match="crop='middle'"):
        preprocess(img, R, "middle", None)
    with pytest.raises(ValueError, match="needs an rng"):
        preprocess(img, R, "random", None)


def _prior_concept(tmp_path, n_inst=3, n_cls=5, name="a"):
    inst = _folder(tmp_path / f"inst_{name}", n_inst, size=(40, 48))
    cls = _folder(tmp_path / f"cls_{name}", n_cls, size=(48, 40), seed=100)
    return Concept(inst, f"a photo of sks {name}", f"a photo of {name}", str(cls), num_class_images=n_cls)


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k]


def test_batches_are_a_pure_function_of_position(tmp_path):
    concept = _prior_concept(tmp_path)
    kw = {"resolution": R, "batch_size": 2, "seed": 7, "center_crop": False, "random_flip": True}
    a, b = DreamboothDataset([concept], **kw), DreamboothDataset([concept], **kw)
    for k in range(6):
        b.batch(k)
    _equal(a.batch(6), b.batch(6))
    _equal(a.batch(3), b.batch(3))
    x = a.batch(2)
    assert x["instance_images"].shape == (2, R, R, 3) and x["class_images"].shape == (2, R, R, 3)
    assert x["instance_images"].dtype == np.float32
    assert -1 <= x["instance_images"].min() <= x["instance_images"].max() <= 1
    assert x["instance_prompts"] == ["a photo of sks a"] * 2 and x["class_prompts"] == ["a photo of a"] * 2
    other = DreamboothDataset([concept], **{**kw, "seed": 8})
    assert any(not np.array_equal(a.batch(k)["instance_images"], other.batch(k)["instance_images"]) for k in range(4))
    with pytest.raises(ValueError, match="position"):
        a.batch(-1)


def test_odd_counts_cover_every_image_each_epoch(tmp_path):
    ds = DreamboothDataset([_prior_concept(tmp_path, 3, 5)], resolution=R, batch_size=2, seed=0)
    inst = np.concatenate([ds.batch(k)["instance_index"] for k in range(15)])  # 30 rows = 10 instance epochs
    cls = np.concatenate([ds.batch(k)["class_index"] for k in range(15)])  # = 6 class epochs
    for e in range(10):
        assert sorted(inst[3 * e:3 * e + 3]) == [0, 1, 2]
    for e in range(6):
        assert sorted(cls[5 * e:5 * e + 5]) == [0, 1, 2, 3, 4]
    assert ds.epoch_size == 3 and ds.epochs_done(15) == 10.0
    rep = DreamboothDataset([_prior_concept(tmp_path, 3, 5)], resolution=R, batch_size=4, seed=0, repeats=2)
    inst = np.concatenate([rep.batch(k)["instance_index"] for k in range(3)])
    assert sorted(inst[:6]) == [0, 0, 1, 1, 2, 2] and sorted(inst[6:]) == [0, 0, 1, 1, 2, 2]


def test_flip_and_crop_come_from_the_stored_image(tmp_path):
    ds = DreamboothDataset([_prior_concept(tmp_path)], resolution=R, batch_size=4, seed=1, center_crop=True,
                           random_flip=True)
    items = {(it.kind, it.index): it for it in ds.iter_all_images()}
    assert len(items) == 3 + 5 and all(it.image.shape == (R, R, 3) for it in items.values())
    flips = []
    for k in range(4):
        b = ds.batch(k)
        for kind in ("instance", "class"):
            for img, i, flip in zip(b[f"{kind}_images"], b[f"{kind}_index"], b[f"{kind}_flip"]):
                ref = items[(kind, int(i))].image
                np.testing.assert_array_equal(img, ref[:, ::-1] if flip else ref)
                flips.append(flip)
    assert any(flips) and not all(flips)
    no_flip = DreamboothDataset([_prior_concept(tmp_path)], resolution=R, batch_size=4, seed=1, center_crop=True,
                                random_flip=False)
    assert not any(no_flip.batch(k)["instance_flip"].any() for k in range(4))
    rand = DreamboothDataset([_prior_concept(tmp_path)], resolution=R, batch_size=4, seed=1, center_crop=False)
    assert any(not np.array_equal(rand.batch(k)["instance_images"], ds.batch(k)["instance_images"]) for k in range(4))


def test_multi_host_shares_make_the_global_batch(tmp_path):
    ds = DreamboothDataset([_prior_concept(tmp_path)], resolution=R, batch_size=4, seed=3)
    for k in (0, 5):
        whole = ds.batch(k)
        parts = [ds.batch(k, process_index=p, process_count=2) for p in range(2)]
        assert parts[0]["instance_images"].shape == (2, R, R, 3)
        for key, value in whole.items():
            joined = np.concatenate([p[key] for p in parts]) if isinstance(value, np.ndarray) \
                else [x for p in parts for x in p[key]]
            np.testing.assert_array_equal(np.asarray(joined), np.asarray(value))
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        ds.batch(0, process_index=0, process_count=3)


def test_several_concepts_pair_their_own_class_images(tmp_path):
    dogs, cats = _prior_concept(tmp_path, 2, 3, "dog"), _prior_concept(tmp_path, 3, 2, "cat")
    ds = DreamboothDataset([dogs, cats], resolution=R, batch_size=3, seed=0)
    assert len(ds.instance_examples) == 5 and len(ds.class_examples) == 5
    for k in range(5):
        b = ds.batch(k)
        for ip, cp in zip(b["instance_prompts"], b["class_prompts"]):
            assert ip.replace("sks ", "") == cp
    no_prior = Concept(tmp_path / "inst_dog", "a photo of sks dog")
    with pytest.raises(ValueError, match="every concept has a class prompt"):
        DreamboothDataset([dogs, no_prior], resolution=R, batch_size=1)
    b = DreamboothDataset([no_prior], resolution=R, batch_size=3).batch(0)
    assert set(b) == {"instance_images", "instance_prompts", "instance_index", "instance_flip"}


def test_class_images_generated_written_one_by_one_and_resumed(tmp_path, tiny_pipe):
    inst = _folder(tmp_path / "inst", 1)
    kw = {"resolution": 32, "batch_size": 2, "seed": 11, "num_inference_steps": 2, "progress": False}

    def concept(folder, n):
        return Concept(inst, "sks", "a photo of dog", str(folder), n)

    calls = []

    class Counting:
        def generate(self, prompts, **k):
            calls.append(len(prompts))
            return tiny_pipe.generate(prompts, **k)

    part = tmp_path / "part"
    part.mkdir()
    (part / "class-00009-20.png.tmp").write_bytes(b"half")  # left by a killed write
    first = ensure_class_images(Counting(), concept(part, 3), **kw)
    assert [p.name for p in first] == ["class-00000-11.png", "class-00001-12.png", "class-00002-13.png"]
    assert calls == [2, 1] and not list(part.glob("*.tmp"))
    before = {p.name: p.stat().st_mtime_ns for p in first}
    paths = ensure_class_images(Counting(), concept(part, 5), **kw)
    assert calls == [2, 1, 2]  # only the 2 missing
    assert [p.name for p in paths] == [f"class-{i:05d}-{11 + i}.png" for i in range(5)]
    assert all(p.stat().st_mtime_ns == before[p.name] for p in first)
    assert ensure_class_images(None, concept(part, 5), **kw) == paths  # nothing missing: no pipeline needed
    assert list_images(part) == paths and len(load_class_images(concept(part, 5))) == 5

    whole = ensure_class_images(tiny_pipe, concept(tmp_path / "whole", 5), **kw)  # batches (0,1) (2,3) (4)
    assert [p.name for p in whole] == [p.name for p in paths]
    for a, b in zip(paths, whole):
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    meta = Image.open(paths[3]).text
    assert meta["prompt"] == "a photo of dog" and meta["seed"] == "14"
    alone = tiny_pipe.generate("a photo of dog", height=32, width=32, num_inference_steps=2, seed=14).images[0]
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(Image.open(paths[3])))  # image i = seed + i

    mine = tmp_path / "mine"  # a user's image counts; generated indices continue after it
    mine.mkdir()
    Image.fromarray(_gradient(40, 40)).save(mine / "my_dog.jpg")
    got = ensure_class_images(tiny_pipe, concept(mine, 2), **kw)
    assert [p.name for p in got] == ["class-00001-12.png", "my_dog.jpg"]
    np.testing.assert_array_equal(np.asarray(Image.open(got[0])), np.asarray(Image.open(paths[1])))


def test_tfds_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install sd_jax\[tfds\]"):
        class_images_from_tfds("oxford_iiit_pet", "train", 10, tmp_path / "cls", label=1)
