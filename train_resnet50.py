"""Train and prune ResNet50 on ImageNet with L0-HC or Dep-L0 gates.

The published commands (the Dep-L0 README's) run unchanged:

    python train_resnet50.py /path/to/imagenet --net dep --lamba 5e-9 --gpu_id 0
    python train_resnet50.py /path/to/imagenet --net dep --back_dep --lamba 5e-9 --gpu_id 0
    python train_resnet50.py /path/to/imagenet --net hc --lamba 5e-9 --gpu_id 0

90 epochs with the penalty, then 10 with the gates frozen. The data folder
holds train/<class>/* and val/<class>/* (ImageNet's layout). Without data:

    python train_resnet50.py --dummy --net dep --epochs 1 --fine_tune_epoch 1 --limit-batches 2 -b 4

Unstructured sparse training at a parameter budget instead of gates (pruning/sparse.py; DSR, SET,
DeepR or a static random mask, each on its code's schedule):

    python train_resnet50.py /path/to/imagenet --sparse dsr --density 0.2 --gpu 0
"""
from engine.cli import Recipe, main

RECIPE = Recipe(
    model="resnet50", imagenet=True,
    lr=0.1, weight_decay=1e-4, milestones=(30, 60, 90), lr_decay=0.1,
    gate_decay=0.2,
    # --net dense: torchvision's recipe (lr 0.1, x0.1 every 30 epochs, 90 epochs), no fine-tune phase.
    dense=(("milestones", (30, 60)), ("fine_tune_epochs", 0)),
    epochs=90, fine_tune_epochs=10, batch_size=256, lamba=1e-7, workers=8,
)

if __name__ == "__main__":
    main(RECIPE)
