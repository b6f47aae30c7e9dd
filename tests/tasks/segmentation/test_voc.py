"""VOC segmentation reader on a tiny VOC-layout directory written here, and the TFDS path."""

import numpy as np
import pytest
from PIL import Image

from cnn.tasks.segmentation import voc

# Published VOC label colours (devkit colour map): index -> RGB.
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 15: (192, 128, 128),
               20: (0, 64, 128), 255: (224, 224, 192)}


def write_palette_png(path, mask):
    """A palette ("P") PNG whose pixel values are the class indices (as VOC's SegmentationClass)."""
    image = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.astype(np.uint8).tobytes())
    palette = np.zeros((256, 3), np.uint8)
    for index, colour in VOC_COLOURS.items():
        palette[index] = colour
    image.putpalette(palette.ravel().tolist())
    image.save(path)


@pytest.fixture
def voc_dir(tmp_path, rng):
    """VOCdevkit/VOC2012 with three images (two PNG, one JPEG), palette labels, train/val lists."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    examples = {}
    for image_id, (height, width), suffix in [("2007_000032", (6, 9), ".png"), ("2007_000039", (8, 5), ".png"),
                                             ("2008_000001", (7, 7), ".jpg")]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if suffix == ".jpg":
            image = np.full((height, width, 3), (200, 40, 90), np.uint8)  # flat: JPEG keeps it within a few levels
        mask = rng.choice([0, 1, 15, 20], (height, width)).astype(np.uint8)
        mask[0, :] = 255  # a "boundary" row
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}{suffix}", quality=100)
        write_palette_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        examples[image_id] = (image, mask)
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n2008_000001\n\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000039\n")
    return tmp_path, examples


def test_colormap_has_the_published_voc_colours():
    colours = voc.voc_colormap()
    assert colours.shape == (256, 3)
    for index, colour in VOC_COLOURS.items():
        assert tuple(colours[index]) == colour, index
    assert len(voc.VOC_SEGMENTATION_CLASSES) == 21 and voc.VOC_SEGMENTATION_CLASSES[15] == "person"


def test_reader_returns_images_and_palette_indices(voc_dir):
    base, examples = voc_dir
    source = voc.VOCSegmentation(base, "train")  # found under base/VOCdevkit/VOC2012
    assert source.root == base / "VOCdevkit" / "VOC2012"
    assert source.ids == ["2007_000032", "2008_000001"] and len(source) == 2
    first = source[0]
    image, mask = examples["2007_000032"]
    np.testing.assert_array_equal(first["image"], image)
    np.testing.assert_array_equal(first["mask"], mask)
    assert first["mask"].dtype == np.uint8 and 255 in first["mask"]
    jpeg_image, jpeg_mask = examples["2008_000001"]
    assert np.abs(source[1]["image"].astype(int) - jpeg_image).max() <= 3
    np.testing.assert_array_equal(source[1]["mask"], jpeg_mask)
    assert voc.read_image_ids(base / "VOCdevkit", "val") == ["2007_000039"]


def test_fixed_size_pads_with_the_ignore_label_and_batches(voc_dir):
    base, examples = voc_dir
    source = voc.VOCSegmentation(base / "VOCdevkit" / "VOC2012", "train", size=(8, 8))
    image, mask = examples["2007_000032"]  # 6 x 9: padded to 8 rows, centre-cropped to 8 columns
    item = source[0]
    assert item["image"].shape == (8, 8, 3) and item["mask"].shape == (8, 8)
    np.testing.assert_array_equal(item["mask"][:6], mask[:, :8])
    assert np.all(item["mask"][6:] == 255) and np.all(item["image"][6:] == 0)
    batches = voc.load(base, "train", 2, size=(8, 8), shuffle=False, num_epochs=1)
    batch = next(batches)
    assert batch["image"].shape == (2, 8, 8, 3) and batch["mask"].shape == (2, 8, 8)


def test_rgb_label_images_map_back_through_the_palette(tmp_path):
    mask = np.array([[0, 1, 15], [255, 20, 3]], np.uint8)
    rgb = np.array([[VOC_COLOURS[v] for v in row] for row in mask], np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(voc.read_label_png(tmp_path / "rgb.png"), mask)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"\(1, 2, 3\)"):
        voc.read_label_png(tmp_path / "bad.png")
    voc.write_label_png(tmp_path / "ours.png", mask)
    with Image.open(tmp_path / "ours.png") as written:
        assert written.mode == "P"
        assert tuple(np.asarray(written.convert("RGB"))[0, 2]) == VOC_COLOURS[15]
    np.testing.assert_array_equal(voc.read_label_png(tmp_path / "ours.png"), mask)


def test_missing_layout_and_split_raise_helpfully(voc_dir, tmp_path):
    base, _ = voc_dir
    with pytest.raises(ValueError, match=r"split='test'.*\['train', 'val'\]"):
        voc.VOCSegmentation(base, "test")
    with pytest.raises(FileNotFoundError, match="path="):
        voc.find_voc_root(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="size"):
        voc.VOCSegmentation(base, "train", size=(0, 4))


def test_tfds_voc_has_no_masks_and_says_where_to_look(tmp_path):
    with pytest.raises(ValueError, match="VOCSegmentation"):
        voc.tfds_source("voc/2012", "train", data_dir=tmp_path)


def _tiny_tfds_builder():
    """A registered TFDS builder with `image` and `segmentation_mask` Tensor features (no TensorFlow)."""
    import tensorflow_datasets as tfds
    from etils import epath
    from tensorflow_datasets.core import utils as tfds_utils

    class CnnTinySegmentationForTests(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        examples: tuple = ()

        @tfds_utils.classproperty
        @classmethod
        def code_path(cls):  # TFDS's default lookup needs importlib_resources for packaged builders
            return epath.Path(__file__)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(4, 5, 3), dtype=np.uint8),
                "segmentation_mask": tfds.features.Tensor(shape=(4, 5, 1), dtype=np.uint8),
            }), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for index, (image, mask) in enumerate(self.examples):
                yield index, {"image": image, "segmentation_mask": mask}

    return CnnTinySegmentationForTests


TINY_BUILDER = None


def test_tfds_source_reads_a_prepared_segmentation_dataset(tmp_path):
    global TINY_BUILDER
    TINY_BUILDER = TINY_BUILDER or _tiny_tfds_builder()  # registered once per process
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (3, 4, 5, 1), dtype=np.uint8)
    TINY_BUILDER.examples = tuple(zip(images, masks))
    TINY_BUILDER(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    with pytest.raises(FileNotFoundError, match="not prepared"):
        voc.tfds_source("cnn_tiny_segmentation_for_tests", "train", data_dir=tmp_path / "empty")
    source = voc.tfds_source("cnn_tiny_segmentation_for_tests", "train", data_dir=tmp_path)
    assert len(source) == 3 and source.mask_key == "segmentation_mask"
    for i in range(3):
        np.testing.assert_array_equal(source[i]["image"], images[i])
        np.testing.assert_array_equal(source[i]["mask"], masks[i, ..., 0])
