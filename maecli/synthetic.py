"""A built-in dashcam world, rendered from code: driving clips (H.264 via PyAV), stills labeled by road curvature,
and stills labeled per pixel (sky, grass, road, shoulder, lane marking, pole, tree, car) for segmentation.

A pinhole camera h_cam metres above a road: screen row y below the horizon sees the ground at distance
z = f * h_cam / (y - y_horizon). The road's centre bends as curvature * z^2 / 2, so a curve shows as the
far road sliding sideways. Lane marks stream toward the camera with the car's speed, curvature comes and
goes, other cars hold their lanes at their own speeds, poles and trees pass by, and the light is day,
dusk or overcast with haze toward the horizon and a little camera shake. Every pixel is computed with
array operations over the whole frame; Python only loops over the few cars and roadside objects.

Everything is a function of the seed: the same seed writes the same files.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from maecli.files import atomic_write
from maecli.video import write_h264

LIGHTS = {  # sky at the horizon, sky at the top, ground tint, brightness
    "day": ((190, 215, 240), (70, 130, 210), (1.0, 1.0, 1.0), 1.0),
    "dusk": ((250, 170, 110), (40, 50, 110), (1.0, 0.85, 0.75), 0.62),
    "overcast": ((205, 205, 210), (150, 155, 165), (0.92, 0.95, 1.0), 0.85),
}
CURVES = {"curve_left": (-0.014, -0.006), "straight": (-0.001, 0.001), "curve_right": (0.006, 0.014)}  # curvature, 1/m (radius 70-170 m)
SEG_CLASSES = ("sky", "grass", "road", "shoulder", "lane marking", "pole", "tree", "car")  # per-pixel labels: index = class id
SEG_PALETTE = ((70, 130, 180), (107, 142, 35), (128, 64, 128), (152, 140, 110), (255, 255, 255), (153, 153, 153), (30, 90, 30), (0, 0, 142))
LANE = 3.6  # metres
H_CAM = 1.8  # camera height, metres (an SUV's dashcam)


@dataclass
class Car:
    lane: int  # -1 left, 0 ego lane, 1 right (of a 3-lane road)
    z0: float  # distance at t = 0, metres
    speed: float  # relative to the camera, m/s (negative: we catch up)
    color: tuple[int, int, int]


@dataclass
class Scene:
    light: str
    speed: float  # m/s
    curve_base: float  # curvature offset, 1/m
    curve_amp: float  # curvature swing, 1/m
    curve_period: float  # seconds
    curve_phase: float
    grass: tuple[int, int, int]
    asphalt: int
    tree: tuple[int, int, int] = (40, 85, 40)
    cars: list[Car] = field(default_factory=list)
    pole_spacing: float = 30.0
    tree_spacing: float = 17.0
    shake: float = 1.0  # pixels


def random_scene(rng: np.random.Generator, curve: tuple[float, float] | None = None) -> Scene:
    """A clip's scene; with `curve`, a fixed curvature drawn from that range (for labeled stills)."""
    cars = [
        Car(lane=int(rng.integers(-1, 2)), z0=float(rng.uniform(8, 90)), speed=float(rng.uniform(-6, 4)), color=tuple(int(c) for c in rng.integers(30, 230, 3)))
        for _ in range(int(rng.integers(0, 5)))
    ]
    fixed = curve is not None
    return Scene(
        light=str(rng.choice(list(LIGHTS))),
        speed=float(rng.uniform(12, 30)),
        curve_base=float(rng.uniform(*curve)) if fixed else float(rng.uniform(-0.002, 0.002)),
        curve_amp=0.0 if fixed else float(rng.uniform(0.005, 0.014)),
        curve_period=float(rng.uniform(6, 14)),
        curve_phase=float(rng.uniform(0, 2 * math.pi)),
        grass=(int(rng.integers(60, 110)), int(rng.integers(100, 150)), int(rng.integers(40, 80))),
        asphalt=int(rng.integers(70, 110)),
        tree=(int(rng.integers(25, 70)), int(rng.integers(60, 110)), int(rng.integers(20, 50))),
        cars=cars,
        pole_spacing=float(rng.uniform(20, 40)),
        tree_spacing=float(rng.uniform(12, 25)),
        shake=float(rng.uniform(0.3, 1.5)),
    )


def render(scene: Scene, t: float, height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One frame at time t: uint8 RGB (height, width, 3), and what each pixel shows: uint8 (height, width) indices
    into SEG_CLASSES."""
    sky_lo, sky_hi, tint, bright = LIGHTS[scene.light]
    f = 0.6 * width  # focal length, pixels: ~80 degrees across, like a dashcam
    horizon = 0.45 * height + scene.shake * math.sin(2 * math.pi * 1.3 * t) + 0.3 * scene.shake * rng.standard_normal()
    curve = scene.curve_base + scene.curve_amp * math.sin(2 * math.pi * t / scene.curve_period + scene.curve_phase)
    travelled = scene.speed * t
    lateral = 0.3 * math.sin(2 * math.pi * t / 9.0)  # the car drifts a little within its lane

    y = np.arange(height, dtype=np.float32)[:, None] + 0.5  # (H, 1)
    x = np.arange(width, dtype=np.float32)[None, :] + 0.5  # (1, W)
    ground = y > horizon + 0.5
    z = np.where(ground, f * H_CAM / np.maximum(y - horizon, 0.5), 1e4)  # (H, 1) distance of each row, metres
    road_x = 0.5 * curve * z**2 + lateral  # (H, 1) road centre, metres, relative to the camera axis
    X = (x - width / 2) * z / f - road_x  # (H, W) lateral position relative to the road centre
    px = z / f  # (H, 1) metres per pixel at that distance

    img = np.empty((height, width, 3), dtype=np.float32)
    sky_t = np.clip((horizon - y) / max(horizon, 1), 0, 1)  # 0 at the horizon, 1 at the top
    sky = (1 - sky_t)[..., None] * np.array(sky_lo) + sky_t[..., None] * np.array(sky_hi)  # (H, 1, 3)
    img[:] = sky
    label = np.zeros((height, width), dtype=np.uint8)  # sky
    on_ground = np.broadcast_to(ground, (height, width))
    grass = np.array(scene.grass) * np.array(tint)
    img[on_ground], label[on_ground] = grass, 1
    road = on_ground & (np.abs(X) < 1.5 * LANE + 0.6)
    img[road], label[road] = scene.asphalt, 2
    shoulder = on_ground & (np.abs(X) >= 1.5 * LANE + 0.6) & (np.abs(X) < 1.5 * LANE + 1.6)
    img[shoulder], label[shoulder] = (150, 140, 120), 3

    line = np.maximum(0.08, 0.7 * px)  # paint width: at least ~a pixel far away
    edges = road & (np.abs(np.abs(X) - 1.5 * LANE) < line)
    img[edges], label[edges] = (235, 235, 225), 4
    dash_on = np.broadcast_to(((z + travelled) % 12.0) < 4.0, (height, width))
    dashes = road & dash_on & (np.abs(np.abs(X) - 0.5 * LANE) < line)
    img[dashes], label[dashes] = (240, 240, 240), 4
    haze = np.exp(-z / 140.0)[..., None]  # (H, 1, 1): far ground fades into the horizon's colour
    img = np.where(ground[..., None], img * haze + np.array(sky_lo) * (1 - haze), img)

    # roadside poles, trees and cars, drawn far to near, each hazed by its own distance
    objects = []
    for spacing, side_x, h_obj, w_obj, color, kind in ((scene.pole_spacing, 1.5 * LANE + 2.5, 7.0, 0.25, (120, 120, 125), 5),
                                                        (scene.tree_spacing, 1.5 * LANE + 6.0, 4.5, 2.0, scene.tree, 6)):
        first = spacing - travelled % spacing
        for k in range(12):
            zk = first + k * spacing
            for side in (-1, 1):
                objects.append((zk, side * side_x, h_obj, w_obj, color, kind))
    for car in scene.cars:
        zc = (car.z0 + car.speed * t) % 110.0 + 4.0
        objects.append((zc, car.lane * LANE, 1.5, 1.8, car.color, 7))
    for zk, xk, h_obj, w_obj, color, kind in sorted(objects, key=lambda o: -o[0]):
        if zk < 2.0:
            continue
        cx = width / 2 + f * (xk + 0.5 * curve * zk**2 + lateral) / zk
        half = 0.5 * w_obj * f / zk
        y_bottom = horizon + f * H_CAM / zk
        y_top = horizon + f * (H_CAM - h_obj) / zk
        x0, x1 = int(max(0, cx - half)), int(min(width, cx + half + 1))
        y0, y1 = int(max(0, y_top)), int(min(height, y_bottom + 1))
        if x0 >= x1 or y0 >= y1:
            continue
        fade = math.exp(-zk / 140.0)
        img[y0:y1, x0:x1] = np.array(color) * fade + np.array(sky_lo) * (1 - fade)
        label[y0:y1, x0:x1] = kind
        if h_obj < 2.0:  # a car: dark windows in its upper third, a shadow underneath
            img[y0 : y0 + max(1, (y1 - y0) // 3), x0:x1] = np.array((35, 40, 50)) * fade + np.array(sky_lo) * (1 - fade)
            img[max(0, y1 - 1) : y1, x0:x1] = np.array((25, 25, 25)) * fade + np.array(sky_lo) * (1 - fade)

    img = img * bright + rng.normal(0, 2.0, img.shape)  # brightness and sensor noise
    return np.clip(img, 0, 255).astype(np.uint8), label


def write_clip(path: Path, scene: Scene, seconds: float, fps: int, height: int, width: int, seed: int) -> Path:
    """One driving clip as H.264 in MP4, written atomically."""
    rng = np.random.default_rng([seed, 1])
    frames = (render(scene, i / fps, height, width, rng)[0] for i in range(round(seconds * fps)))
    return write_h264(path, frames, fps, (height, width))


def generate_clips(folder: Path, *, count: int, seconds: float, fps: int = 10, size: tuple[int, int] = (144, 256), seed: int = 0) -> list[Path]:
    """`count` clips named clip-000.mp4, ...; existing ones are kept (a rerun continues)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"clip-{i:03d}.mp4"
        if not path.exists():
            write_clip(path, random_scene(np.random.default_rng([seed, 0, i])), seconds, fps, *size, seed=seed * 100_000 + i)
        paths.append(path)
    return paths


def generate_labeled(folder: Path, *, per_class: int, size: tuple[int, int] = (96, 192), seed: int = 0) -> dict[str, int]:
    """Still frames labeled by road curvature (curve_left / straight / curve_right) in ImageFolder layout."""
    counts = {}
    for c, (name, curve) in enumerate(CURVES.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / name / f"{i:05d}.png"
            if not path.exists():
                rng = np.random.default_rng([seed, 2, c, i])
                rgb, _ = render(random_scene(rng, curve), float(rng.uniform(0, 20)), *size, rng)
                with atomic_write(path) as tmp:
                    Image.fromarray(rgb).save(tmp, format="PNG")
        counts[name] = per_class
    return counts


def generate_segmentation(folder: Path, *, count: int, size: tuple[int, int] = (96, 192), seed: int = 0) -> int:
    """`count` stills of random scenes with their per-pixel labels: images/NNNNN.png, masks/NNNNN.png (class indices)
    and classes.csv (names and palette): a segmentation set as `maecli probe` reads it. Existing files are kept."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rows = ["class_id,name,r,g,b"] + [f"{i},{name},{r},{g},{b}" for i, (name, (r, g, b)) in enumerate(zip(SEG_CLASSES, SEG_PALETTE, strict=True))]
    with atomic_write(folder / "classes.csv") as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    for i in range(count):
        image, mask = folder / "images" / f"{i:05d}.png", folder / "masks" / f"{i:05d}.png"
        if image.exists() and mask.exists():
            continue
        rng = np.random.default_rng([seed, 3, i])
        rgb, label = render(random_scene(rng), float(rng.uniform(0, 20)), *size, rng)
        for path, array in ((mask, label), (image, rgb)):  # the image last: a pair whose image exists is complete
            with atomic_write(path) as tmp:
                Image.fromarray(array).save(tmp, format="PNG")
    return count
