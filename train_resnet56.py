"""Train and prune ResNet56 (option-B shortcuts) on CIFAR-10/100 with L0-HC or Dep-L0 gates.

The published commands (the Dep-L0 README's) run unchanged:

    python train_resnet56.py --net dep --num_classes 10 --lamba 5e-7 --gpu 0
    python train_resnet56.py --net dep --back_dep --num_classes 10 --lamba 1e-6 --gpu 0
    python train_resnet56.py --net hc --num_classes 100 --lamba 5e-7 --gpu 0

Try it without data, on any machine:

    python train_resnet56.py --net dep --dummy --epoch 2 --limit-batches 5 -b 32

Unstructured sparse training at a parameter budget instead of gates (pruning/sparse.py; DSR, SET,
DeepR or a static random mask, each on its code's schedule):

    python train_resnet56.py --sparse dsr --density 0.2 --gpu 0
"""
from engine.cli import Recipe, main

RECIPE = Recipe(
    model="resnet56", imagenet=False,
    lr=0.1, weight_decay=5e-4, milestones=(60, 120, 180, 240), lr_decay=0.1,
    gate_decay=None, gate_decay_is_lr_decay=True,  # the gate lr decays by --lr_decay, as in the reference
    # --net dense: the peers' base training (GReg's ResNet56 recipe; its VGG has none published).
    dense=(("lr", 0.1), ("milestones", (100, 150)), ("lr_decay", 0.1), ("epochs", 200), ("weight_decay", 5e-4)),
    epochs=300, fine_tune_epochs=0, batch_size=128, lamba=5e-7, workers=4,
)

if __name__ == "__main__":
    main(RECIPE)
