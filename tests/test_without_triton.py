"""Without triton installed (CPU-only torch, macOS) the fast path still imports and runs in PyTorch."""
import subprocess
import sys

SCRIPT = r"""
import sys, warnings
sys.modules["triton"] = None  # as if triton were not installed
sys.path.insert(0, "tests")
warnings.simplefilter("ignore")
import torch
from stop_fast.kernels import dispatch
assert not dispatch.HAS_TRITON
from helpers import make_stop, random_video
model = make_stop(randomize=True)
video = random_video(model)
fast, ref = model.encode_video(video, impl="fast"), model.encode_video(video)
assert (fast - ref).abs().max() < 1e-5, (fast - ref).abs().max()
print("ok")
"""


def test_fast_path_runs_in_pytorch_without_triton():
    env_free = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert env_free.returncode == 0, env_free.stderr[-3000:]
    assert env_free.stdout.strip().endswith("ok")
