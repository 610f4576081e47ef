"""Score one fold's validation set with fixed weights; run with 1 process or under
`accelerate launch --multi_gpu --num_processes 2`: the main process writes the metrics JSON."""

import json
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from brats.data.cache_reader import open_cache
from brats.data.folds import make_splits
from brats.evaluation.scoring import predict, score
from brats.models.resnet import build_model
from brats.training.config import make_config
from brats.training.datasets import CachedVolumes

cache, out = sys.argv[1], sys.argv[2]
accelerator = Accelerator(cpu=True)
cached = open_cache(cache)
splits = make_splits(cached.patient_ids, cached.labels.tolist(), k=4, seed=42)  # 5 val patients
fold = splits.fold(0, cached.patient_ids, cached.labels.tolist())
ds = CachedVolumes(cached, cached.indices(fold.val), ("t1", "t1ce", "t2", "flair"))
torch.manual_seed(0)
model = build_model(make_config(data=cache, depth=10))
loader = DataLoader(ds, batch_size=2)
model, loader = accelerator.prepare(model, loader)
logits, labels = predict(model, loader, accelerator)
metrics, _ = score(logits, labels)
if accelerator.is_main_process:
    json.dump(
        {"n": len(labels), "logits": logits.tolist(), "labels": labels.tolist(), "metrics": metrics},
        open(out, "w"),
    )
accelerator.end_training()
