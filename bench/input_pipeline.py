"""ImageNet input pipeline throughput: JPEG decode + RandomResizedCrop + flip, per worker count.

    python bench/input_pipeline.py --workers 0,1,2 --images 400

Writes a folder of random JPEGs of ImageNet's typical size (500x375, quality
90) once, then reads it through exactly the loader the training engine builds
(``utils.data.build_datasets('imagenet', ...)``, ``SeededDataset``,
``ResumableSampler``, ``utils.run.loader_options``) and reports training
images/s for each worker count. Compare with the GPU's training throughput
(``bench/train_step.py``) to find how many loader processes keep it fed.

Side by side, in interleaved passes, it also times the same loader with
torchvision's usual tail (``ToTensor`` + ``Normalize`` in the workers, float32
batches) instead of the engine's (uint8 batches, normalised on the device by
``utils.data.DeviceNormalize``, which is not timed here: on a GPU it is one
elementwise pass over the batch) and prints the ratio.
"""
import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.data import IMAGENET_MEAN, IMAGENET_STD, build_datasets  # noqa: E402
from utils.distributed import Context  # noqa: E402
from utils.run import loader_options  # noqa: E402
from utils.sampling import ResumableSampler, SeededDataset  # noqa: E402


def write_folder(root: Path, images: int, classes: int = 4) -> None:
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", images), ("val", classes)):
        for i in range(n):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            # Smooth random content compresses like a photo, unlike white noise.
            small = torch.randint(0, 256, (3, 24, 32), generator=g, dtype=torch.uint8)
            pixels = torch.nn.functional.interpolate(small[None].float(), size=(375, 500), mode="bilinear")[0]
            Image.fromarray(pixels.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(folder / f"{i}.jpg", quality=90)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--images", type=int, default=400, help="training images in the synthetic folder")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_folder(root, args.images)
        train, _, _ = build_datasets("imagenet", str(root))
        assert isinstance(train.transform.transforms[-1], transforms.PILToTensor)
        tails = {
            "uint8": train.transform,
            "float32": transforms.Compose(train.transform.transforms[:-1] + [
                transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]),
        }
        print(f"{args.images} JPEGs 500x375 -> RandomResizedCrop(224) + flip, batch {args.batch_size}, "
              f"median of {args.reps} interleaved passes, torch {torch.__version__}", flush=True)
        print(f"{'workers':>8} {'uint8 img/s':>12} {'float32 img/s':>14} {'uint8/float32':>14}", flush=True)
        for workers in (int(w) for w in args.workers.split(",")):
            rates = {name: [] for name in tails}
            loaders = {}
            for name, tail in tails.items():
                dataset = copy.copy(train)
                dataset.transform = tail
                sampler = ResumableSampler(dataset, Context(), seed=0, batch_size=args.batch_size)
                loader = DataLoader(SeededDataset(dataset), batch_size=args.batch_size, sampler=sampler,
                                    **loader_options(workers, torch.device("cpu")))
                loaders[name] = sampler, loader
            for epoch in range(args.reps + 1):
                for name, (sampler, loader) in loaders.items():
                    sampler.start_at(epoch, 0)
                    start, seen = time.perf_counter(), 0
                    for images, _ in loader:
                        seen += images.shape[0]
                    if epoch:  # the first pass starts the workers
                        rates[name].append(seen / (time.perf_counter() - start))
            del loaders
            uint8, float32 = (statistics.median(rates[name]) for name in tails)
            print(f"{workers:>8} {uint8:>12.1f} {float32:>14.1f} {uint8 / float32:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
