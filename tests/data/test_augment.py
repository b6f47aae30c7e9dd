"""Augmentation: exact geometric identities, boxes and masks that follow the image, colour ranges."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn.data import augment, synthetic

NUM = 8


@pytest.fixture(scope="module")
def scene():
    """8 synthetic images whose objects are drawn into the image as their instance ids (x 60),
    so image and masks must move identically under nearest-neighbour sampling."""
    d = synthetic.shapes(NUM, image_size=24, max_objects=3, min_size=5, max_size=9, seed=21)
    drawn = np.repeat((d["instance_mask"] * 60).astype(np.uint8)[..., None], 3, axis=-1)
    targets = {k: jnp.asarray(d[k]) for k in ("mask", "instance_mask", "boxes", "box_valid", "box_classes", "label")}
    return jnp.asarray(drawn), targets, jnp.asarray(d["image"])


def _example(scene, n):
    images, targets, _ = scene
    return images[n], {k: v[n] for k, v in targets.items()}


def test_flipping_twice_is_the_identity(scene):
    image, targets = _example(scene, 0)
    for flip in (augment.flip_horizontal, augment.flip_vertical):
        once = flip(image, targets)
        twice = flip(*once)
        assert not np.array_equal(once[0], image)
        np.testing.assert_array_equal(twice[0], image)
        for key, value in targets.items():
            np.testing.assert_array_equal(twice[1][key], value)


def test_rotation_by_multiples_of_90_degrees_equals_rot90(scene):
    image, targets = _example(scene, 1)
    photo = scene[2][1]
    nearest = jax.jit(lambda degrees: augment.rotate(photo, targets, degrees, order=0))
    bilinear = jax.jit(lambda degrees: augment.rotate(photo.astype(jnp.float32) / 255, {}, degrees, order=1)[0])
    for k in (1, 2, 3):
        rotated, new_targets = nearest(90.0 * k)
        np.testing.assert_array_equal(rotated, jnp.rot90(photo, k))
        np.testing.assert_array_equal(new_targets["mask"], jnp.rot90(targets["mask"], k))
        np.testing.assert_allclose(bilinear(90.0 * k), jnp.rot90(photo, k) / 255.0, atol=1e-5)


def test_shift_moves_a_one_hot_pixel_by_the_shift():
    image = jnp.zeros((9, 11, 1), jnp.float32).at[4, 5, 0].set(1.0)
    box = {"boxes": jnp.array([[5.0, 4.0, 6.0, 5.0]])}
    moved, targets = augment.translate(image, box, 3, -2)
    expected = np.zeros((9, 11, 1))
    expected[2, 8, 0] = 1.0
    np.testing.assert_array_equal(moved, expected)
    np.testing.assert_array_equal(targets["boxes"], [[8.0, 2.0, 9.0, 3.0]])
    gone, targets = augment.translate(image, box, 6, 0)  # the pixel leaves on the right
    assert float(gone.sum()) == 0.0 and not bool(targets["box_valid"][0])
    # Traced shifts under jit, and the random op: the pixel and its box move together.
    jitted = jax.jit(lambda dx, dy: augment.translate(image, box, dx, dy)[0])
    np.testing.assert_array_equal(jitted(3, -2), expected)
    shift = jax.jit(lambda key: augment.random_shift(4)(key, image, box))
    seen = set()
    for seed in range(12):
        out, out_targets = shift(jax.random.key(seed))
        ((row, col),) = np.argwhere(np.asarray(out[..., 0]) == 1.0)
        dy, dx = row - 4, col - 5
        assert max(abs(dx), abs(dy)) <= 4
        np.testing.assert_array_equal(out_targets["boxes"][0], [5 + dx, 4 + dy, 6 + dx, 5 + dy])
        seen.add((dx, dy))
    assert len(seen) > 6


def _exact_ops():
    return {
        "flip_h": lambda key, im, t: augment.flip_horizontal(im, t),
        "flip_v": lambda key, im, t: augment.flip_vertical(im, t),
        "random_flip": augment.random_flip(horizontal=True, vertical=True),
        "translate": lambda key, im, t: augment.translate(im, t, 7, -5),
        "random_shift": augment.random_shift(6),
        "cifar_standard": augment.cifar_standard(),
        "random_rot90": augment.random_rot90(),
    }


def _resampling_ops():
    return {
        "rotate_30": lambda key, im, t: augment.rotate(im, t, 30.0, order=0),
        "rotate_-135": lambda key, im, t: augment.rotate(im, t, -135.0, order=0),
        "zoom_in": lambda key, im, t: augment.zoom(im, t, 1.6, order=0),
        "zoom_out": lambda key, im, t: augment.zoom(im, t, 0.6, order=0),
        "random_rotation": augment.random_rotation(45.0, order=0),
        "random_zoom": augment.random_zoom(0.7, 1.5, order=0),
        "random_affine": augment.random_affine(40.0, 0.7, 1.4, 3.0, flip_horizontal=True, order=0),
        "everything": augment.compose(
            [
                augment.random_rotation(25.0, order=0),
                augment.random_zoom(0.8, 1.3, order=0),
                augment.cifar_standard(),
                augment.random_flip(vertical=True),
            ]
        ),
    }


def _tight_box(pixels):
    rows, cols = np.nonzero(pixels)
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


@pytest.mark.parametrize("exact", [True, False], ids=["exact_ops", "resampling_ops"])
def test_boxes_stay_around_the_object_drawn_into_the_image(scene, exact):
    images, targets, _ = scene
    ops = _exact_ops() if exact else _resampling_ops()
    # One compiled program applies every op (compiling each op separately costs far more).
    run_all = jax.jit(
        lambda key: {name: jax.vmap(op)(jax.random.split(key, NUM), images, targets) for name, op in ops.items()}
    )
    for seed in range(2):
        results = run_all(jax.random.key(seed))
        for name, (out_images, out) in results.items():
            out_images, out = np.asarray(out_images), {k: np.asarray(v) for k, v in out.items()}
            # The image moved exactly like the masks (nearest sampling, fill 0 = background).
            np.testing.assert_array_equal(out_images[..., 0], out["instance_mask"] * 60, err_msg=name)
            np.testing.assert_array_equal(out["mask"] > 0, out["instance_mask"] > 0, err_msg=name)
            np.testing.assert_array_equal(out["label"], np.asarray(targets["label"]))
            for n in range(NUM):
                for k in range(3):
                    pixels = out["instance_mask"][n] == k + 1
                    if not targets["box_valid"][n, k]:
                        assert not out["box_valid"][n, k] and not pixels.any()
                        continue
                    fully_visible = pixels.sum() == int((targets["instance_mask"][n] == k + 1).sum())
                    if exact and fully_visible:  # whole-pixel moves keep boxes tight
                        np.testing.assert_array_equal(out["boxes"][n, k], _tight_box(pixels), err_msg=name)
                    if pixels.any():
                        assert out["box_valid"][n, k], (name, n, k)
                        rows, cols = np.nonzero(pixels)
                        x0, y0, x1, y1 = out["boxes"][n, k]
                        # One resampling keeps pixel centres inside the box; a chain of two
                        # (rotation then zoom <= 1.3) may leave them up to 0.5 * sqrt(2) * 1.3 px out.
                        slack = 0.92 if name == "everything" else 1e-4
                        inside = (cols + 0.5 >= x0 - slack) & (cols + 0.5 <= x1 + slack)
                        inside &= (rows + 0.5 >= y0 - slack) & (rows + 0.5 <= y1 + slack)
                        assert inside.all(), (name, n, k)
                        assert 0 <= x0 <= x1 <= 24 and 0 <= y0 <= y1 <= 24


def test_rotation_box_is_the_box_of_the_rotated_corners():
    box = {"boxes": jnp.array([[8.0, 10.0, 12.0, 14.0]])}  # centred at (10, 12) in a 20x20 image
    _, out = augment.rotate(jnp.zeros((20, 20, 1)), box, 45.0)
    # Corners at distance 2*sqrt(2) from (10, 12) rotate onto the axes around the image centre
    # (10, 10): the box centre goes to (10 + 2 sin 45, 10 + 2 cos 45), half-width 2*sqrt(2).
    cx, cy, half = 10 + 2 * np.sin(np.pi / 4), 10 + 2 * np.cos(np.pi / 4), 2 * np.sqrt(2)
    np.testing.assert_allclose(out["boxes"][0], [cx - half, cy - half, cx + half, cy + half], atol=1e-5)


def test_recolouring_keeps_values_in_range(rng):
    photo = jnp.asarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    floats = photo.astype(jnp.float32) / 255

    @jax.jit
    def extremes(image):
        return [
            augment.adjust_brightness(image, 0.9),
            augment.adjust_brightness(image, -0.9),
            augment.adjust_contrast(image, 6.0),
            augment.adjust_saturation(image, 8.0),
            augment.adjust_hue(image, 0.37),
        ]

    for out in extremes(photo):
        assert out.dtype == jnp.uint8 and out.shape == photo.shape
    outs = extremes(floats)
    for out in outs:
        assert out.dtype == jnp.float32 and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(outs[0].min()) > 0.5 and float(outs[1].max()) < 0.5
    op = augment.compose(
        [
            augment.random_brightness(0.5),
            augment.random_contrast(0.2, 3.0),
            augment.random_saturation(0.0, 3.0),
            augment.random_hue(0.5),
        ]
    )
    keys = jax.random.split(jax.random.key(0), 16)
    out, targets = jax.jit(jax.vmap(op, in_axes=(0, None, None)))(keys, floats, {"label": jnp.int32(3)})
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0 and np.all(np.asarray(targets["label"]) == 3)
    assert len({np.asarray(o).tobytes() for o in out}) == 16  # every key recolours differently


def test_colour_transforms_against_hand_formulas_and_colorsys(rng):
    photo = jnp.asarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    floats = photo.astype(jnp.float32) / 255

    @jax.jit
    def transforms(image, values):
        identities = [
            augment.adjust_brightness(image, 0.0),
            augment.adjust_contrast(image, 1.0),
            augment.adjust_saturation(image, 1.0),
            augment.adjust_hue(image, 0.0),
        ]
        return (
            identities,
            augment.adjust_saturation(values, 0.0),
            augment.adjust_contrast(values, 0.0),
            augment.adjust_hue(values, 0.1),
        )

    identities, gray, flat, shifted = transforms(photo, floats)
    for out in identities:
        np.testing.assert_array_equal(out, photo)
    values = np.asarray(photo, np.float64) / 255
    luma = values @ np.array([0.299, 0.587, 0.114])
    for c in range(3):
        np.testing.assert_allclose(gray[..., c], luma, atol=1e-6)
    np.testing.assert_allclose(flat, np.broadcast_to(values.mean(axis=(0, 1)), values.shape), atol=1e-6)
    shifted = np.asarray(shifted)
    for i in range(6):
        for j in range(5):
            h, s, v = colorsys.rgb_to_hsv(*values[i, j])
            np.testing.assert_allclose(shifted[i, j], colorsys.hsv_to_rgb((h + 0.1) % 1.0, s, v), atol=1e-5)
    primaries = jnp.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # red -> green, green -> blue
    np.testing.assert_allclose(augment.adjust_hue(primaries, 1 / 3), [[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], atol=1e-6)
    gray_image = jnp.full((2, 2, 1), 0.4)  # one channel: hue and saturation leave it alone
    np.testing.assert_array_equal(augment.adjust_hue(gray_image, 0.2), gray_image)


def test_apply_batch_is_jittable_and_equals_the_per_example_loop(scene):
    images, targets, photos = scene
    batch = {"image": photos, **targets}
    op = augment.compose([augment.cifar_standard(), augment.random_rotation(20.0), augment.random_brightness(0.2)])
    run = jax.jit(lambda key, b, offset: augment.apply_batch(op, key, b, offset=offset))
    key = jax.random.key(42)
    out = run(key, batch, 0)
    again = run(key, batch, 0)
    for name in out:
        np.testing.assert_array_equal(out[name], again[name])
    assert out["image"].dtype == jnp.uint8 and set(out) == set(batch)
    keys = augment.example_keys(key, NUM)
    single = jax.jit(op)
    for n in (0, 5):
        image, t = single(keys[n], photos[n], {k: v[n] for k, v in targets.items()})
        np.testing.assert_allclose(np.asarray(out["image"][n], np.int32), np.asarray(image, np.int32), atol=1)
        np.testing.assert_array_equal(out["mask"][n], t["mask"])
        np.testing.assert_allclose(out["boxes"][n], t["boxes"], atol=1e-5)
    other = run(jax.random.key(43), batch, 0)
    assert not np.array_equal(other["image"], out["image"])
    # Example keys do not depend on the batch: a shard holding examples 4..7 first, with
    # offset 4, draws what the whole batch drew for them.
    rolled = run(key, {k: jnp.roll(v, -4, axis=0) for k, v in batch.items()}, 4)
    np.testing.assert_array_equal(rolled["mask"][:4], out["mask"][4:])
    np.testing.assert_array_equal(rolled["boxes"][:4], out["boxes"][4:])


def test_random_apply_and_compose():
    plus_one = lambda key, image, targets: (image + 1.0, dict(targets))  # noqa: E731
    image = jnp.zeros((2, 2, 1))
    never = augment.random_apply(plus_one, 0.0)
    always = augment.random_apply(plus_one, 1.0)
    sometimes = jax.vmap(augment.random_apply(plus_one, 0.5), in_axes=(0, None, None))
    assert float(never(jax.random.key(0), image, {})[0].sum()) == 0.0
    assert float(always(jax.random.key(0), image, {})[0].sum()) == 4.0
    applied = np.asarray(sometimes(jax.random.split(jax.random.key(1), 400), image, {})[0][:, 0, 0, 0])
    assert 0.4 < applied.mean() < 0.6
    np.testing.assert_array_equal(augment.compose([])(jax.random.key(0), image, {})[0], image)
    assert float(augment.compose([plus_one, plus_one])(jax.random.key(0), image, {})[0][0, 0, 0]) == 2.0


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"image must be \[height, width, channels\]"):
        augment.flip_horizontal(jnp.zeros((2, 4, 4, 3)), {})
    with pytest.raises(ValueError, match="order must be 0"):
        augment.rotate(jnp.zeros((4, 4, 1)), {}, 10.0, order=3)
    with pytest.raises(ValueError, match="min_scale"):
        augment.random_zoom(0.0, 1.0)
    with pytest.raises(ValueError, match="'image'"):
        augment.apply_batch(augment.random_flip(), jax.random.key(0), {"label": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"batch\['image'\] must be \[batch"):
        augment.apply_batch(augment.random_flip(), jax.random.key(0), {"image": jnp.zeros((4, 4, 3))})


# ------------------------------------------------------------------ YOLO v1's HSV colour jitter


def test_exposure_and_saturation_scale_v_and_s_of_a_known_pixel():
    """RGB (0.6, 0.4, 0.2): hue 30 degrees, S = 2/3, V = 0.6. Exposure 1.5 and saturation 1.2
    give V = 0.9, S = 0.8: max 0.9, min V (1 - S) = 0.18, and at hue 30 degrees green lies halfway,
    0.18 + 0.5 (0.9 - 0.18) = 0.54."""
    pixel = jnp.array([[[0.6, 0.4, 0.2]]], jnp.float32)
    out = augment.scale_exposure_saturation(pixel, 1.5, 1.2)
    np.testing.assert_allclose(np.asarray(out)[0, 0], [0.9, 0.54, 0.18], atol=1e-6)
    # S and V clip at 1: saturation 2 makes S = 4/3 -> 1 (min channel 0), exposure 2 makes V = 1.2 -> 1
    out = augment.scale_exposure_saturation(pixel, 2.0, 2.0)
    np.testing.assert_allclose(np.asarray(out)[0, 0], [1.0, 0.5, 0.0], atol=1e-6)
    # uint8 in, uint8 out (rounded); a gray image is its own value
    np.testing.assert_array_equal(
        augment.scale_exposure_saturation(jnp.array([[[153, 102, 51]]], jnp.uint8), 1.5, 1.2), [[[230, 138, 46]]])
    np.testing.assert_allclose(augment.scale_exposure_saturation(jnp.full((2, 2, 1), 0.4), 1.5, 3.0), 0.6, atol=1e-6)


def test_random_exposure_saturation_draws_darknet_factors_in_the_stated_range(rng):
    """Each factor is U[1, 1.5] or its inverse: V and S of a mid-range pixel change by a factor in
    [1/1.5, 1.5], both directions occur, and hue stays."""
    op = augment.random_exposure_saturation(1.5, 1.5)
    pixel = jnp.array([[[0.4, 0.3, 0.2]]], jnp.float32)  # S = 0.5, V = 0.4: nothing clips
    outs = jax.vmap(lambda k: op(k, pixel, {})[0])(jax.random.split(jax.random.key(3), 2000))
    hsv = np.array([colorsys.rgb_to_hsv(*rgb) for rgb in np.asarray(outs).reshape(-1, 3)])
    for channel, base in ((1, 0.5), (2, 0.4)):
        factor = hsv[:, channel] / base
        assert factor.min() >= 1 / 1.5 - 1e-5 and factor.max() <= 1.5 + 1e-5
        assert 0.4 < np.mean(factor > 1) < 0.6  # s or 1/s with probability 1/2
        assert factor.max() > 1.45 and factor.min() < 1 / 1.45
    np.testing.assert_allclose(hsv[:, 0], colorsys.rgb_to_hsv(0.4, 0.3, 0.2)[0], atol=1e-5)
    with pytest.raises(ValueError, match="max_exposure=0.5"):
        augment.random_exposure_saturation(0.5, 1.5)


def test_yolo_augmentation_includes_the_papers_colour_jitter():
    from cnn.tasks.detection.augmentation import make_augmentation

    image = jnp.full((16, 16, 3), 0.3, jnp.float32).at[..., 0].set(0.5)  # a flat colour: geometry moves nothing inside
    boxes = {"boxes": jnp.array([[4.0, 4.0, 12.0, 12.0]])}
    colour_only = make_augmentation((16, 16), scale=0.0, shift=0.0, flip=False)
    assert colour_only is not None
    out, targets = colour_only(jax.random.key(0), image, boxes)
    np.testing.assert_array_equal(targets["boxes"], boxes["boxes"])
    hsv_in = colorsys.rgb_to_hsv(0.5, 0.3, 0.3)
    hsv_out = colorsys.rgb_to_hsv(*np.asarray(out)[8, 8])
    assert hsv_out[1] != pytest.approx(hsv_in[1]) and hsv_out[2] != pytest.approx(hsv_in[2])
    assert make_augmentation((16, 16), scale=0.0, shift=0.0, flip=False, exposure=1.0, saturation=1.0) is None
