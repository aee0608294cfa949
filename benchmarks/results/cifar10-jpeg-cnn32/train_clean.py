"""The clean reference model of the CIFAR-10 table: the same recipe as the backdoored models
(small CNN width 32, 6 epochs, seed 0), no poison. Run from the repository root:

    python benchmarks/results/cifar10-jpeg-cnn32/train_clean.py /tmp/data
"""
import sys

import torch

from fire_repair.eval import attacks, data, harness, models, train
from fire_repair.eval.metrics import predict

ds = data.load("cifar10", sys.argv[1], cache_dir=".fire-cache")
torch.manual_seed(0)
model = models.build("cnn", 10, 32)
spec = {"attack": "clean", "model": "cnn", "width": 32, "data": "cifar10", "n_train": len(ds.y_train), "seed": 0,
        "epochs": 6}
model, cached = train.load_or_train(model, ds.x_train, ds.y_train, ".fire-cache", spec, epochs=6, seed=0,
                                    progress=False)
# the evaluation half of the table's runs (the harness's seeded split, 2,000 images)
_, (eval_x, eval_y), _, _ = harness.split(harness.RunConfig(n_eval=2000), ds, attacks.build("badnets"))
print("clean CA: whole test set", (predict(model, ds.x_test) == ds.y_test).float().mean().item(),
      "evaluation half", (predict(model, eval_x) == eval_y).float().mean().item(), "cached", cached)
