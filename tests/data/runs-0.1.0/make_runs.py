import sys, warnings
sys.path.insert(0, "/work/main/tests")
from train_fixtures import make_dataset
from stop_fast.train import TrainConfig, train
root = make_dataset("/tmp/legacygen/data", per_class=2, classes=2)
common = dict(dataset="csv", video_root=root, model="stop-tiny", frames=4, k=2, rho=2, r_intra=8, r_inter=8,
              batch_size=2, epochs=2, lr=1e-2, device="cpu", workers=0, progress=False, seed=3, log_every=1)
warnings.simplefilter("ignore")
r1 = train(TrainConfig(out="/tmp/legacygen/full", **common))
r2 = train(TrainConfig(out="/tmp/legacygen/stopped", stop_after_steps=2, **common))
print(r1); print(r2)
